"""Settings: the only place that reads flags and environment variables."""

import os
import secrets
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    """Every flag of `prefix-serve`; each also comes from env `PREFIX_SERVE_<FLAG>`."""

    model_config = SettingsConfigDict(env_prefix="PREFIX_SERVE_", populate_by_name=True, extra="ignore")

    model: str | None = Field(None, description="HF hub id or local dir; default: the built-in demo model")
    trust_remote_code: bool = Field(
        False,
        description="true: run Python code a model ships (its config.json auto_map); default: refuse it",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    replica_id: str | None = Field(
        None, description="this replica's name in the X-Replica response header; default <hostname>:<port>"
    )
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("PREFIX_SERVE_REDIS_URL", "REDIS_URL"),
        description="default: an embedded Redis under the data dir",
    )
    redis_min_replicas: int = Field(
        1,
        ge=0,
        description="an upload is acknowledged once this many Redis replicas have it (WAIT), "
        "at most as many as are connected; 0 = do not wait",
    )
    redis_wait_ms: int = Field(
        1000, ge=1, description="how long an upload waits for replicas before failing with 503"
    )
    data_dir: Path = Path("./data")
    admin_token: str | None = Field(
        None,
        validation_alias=AliasChoices("PREFIX_SERVE_ADMIN_TOKEN", "PREFIX_ADMIN_TOKEN"),
        description="default: --admin-token-file, else generated once, printed and saved under the data dir",
    )
    admin_token_file: Path | None = Field(
        None, description="a file holding the admin token (keeps it out of `ps` and of the environment)"
    )
    max_batch_size: int = Field(256, ge=1, description="rows running at once at most")
    max_queue: int = Field(256, ge=1, description="waiting requests beyond which new ones get 429")
    cache_bytes: int | None = Field(
        None,
        ge=0,
        description="deprecated, no effect: the device prefix tier is the KV pool (--kv-cache-bytes)",
    )
    host_cache_bytes: int = Field(1024 * MiB, ge=0, description="host-memory prefix cache budget")
    coherence_interval_s: float = Field(
        0.5, gt=0, description="how often resident prefixes are checked against Redis versions"
    )
    kv_cache_bytes: int = Field(
        1024 * MiB,
        ge=1,
        description="KV pool memory (blocks of 16 positions): rows' KV and resident prefixes, one budget",
    )
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="on CUDA: the KV pool takes this fraction of the device memory free after loading "
        "the weights, instead of --kv-cache-bytes; ignored on CPU",
    )
    max_model_len: int | None = Field(None, ge=2, description="cap on prefix+prompt+output positions")
    max_new_tokens: int = Field(1024, ge=1, description="largest max_new_tokens a request may ask")
    max_upload_bytes: int = Field(512 * MiB, ge=1, description="largest prefix upload")
    max_body_bytes: int = Field(
        1 * MiB, ge=1024, description="largest request body outside prefix uploads (those: max-upload-bytes)"
    )
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="longest prompt in tokens; default: whatever fits the context"
    )
    max_prompt_chars: int = Field(
        1 << 20,
        ge=1,
        description="characters of prompt text (or chat message content) one request may carry in all",
    )
    max_stop_strings: int = Field(4, ge=0, description="stop strings a request may send at most")
    request_timeout: float | None = Field(
        300.0, gt=0, description="seconds a generation may take, queueing included, before it is cut off"
    )
    drain_seconds: float = Field(
        30.0, ge=0, description="on SIGTERM: how long running requests may take to finish before exit"
    )
    log_level: str = "info"
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per log line")
    metrics_max_tasks: int = Field(
        20, ge=0, description="tasks that get their own label in per-task metrics (the rest: task=other)"
    )
    metrics_per_task: Literal["auto", "on", "off"] = Field(
        "auto", description="per-task metric labels; auto = on until API keys exist, then off"
    )
    metrics_token: str | None = Field(
        None, description="when set, /metrics needs `Authorization: Bearer <it>`"
    )
    metrics_vllm_names: bool = Field(
        False, description="also export the vLLM metric names the Gateway API Inference Extension scrapes"
    )
    max_prompts: int = Field(32, ge=1, description="prompts (x n) one /v1/completions request may carry")
    max_rows_per_tenant: int | None = Field(
        None, ge=1, description="running rows one tenant may hold; default: a fair share when others wait"
    )
    max_connections: int = Field(
        1024, ge=1, description="open HTTP connections beyond which new ones are refused"
    )
    max_connections_per_client: int = Field(
        64,
        ge=1,
        description="open HTTP connections (behind a trusted proxy: requests in flight) one client "
        "address may have; beyond it new ones are refused",
    )
    forwarded_allow_ips: str | None = Field(
        None,
        description="comma-separated proxy addresses (or *) whose X-Forwarded-For names the real "
        "client; default: trust none",
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="seconds a client may take to send its request headers; then each such window "
        "must bring --min-body-rate of its body",
    )
    min_body_rate: float = Field(
        1024.0, gt=0, description="bytes/s a request body must arrive at, at least, while it streams in"
    )
    docs: bool = Field(False, description="true: serve the API docs UI (/docs, /redoc) and /openapi.json")
    stream_stall_timeout: float = Field(
        30.0, gt=0, description="seconds a stream may go unread before it is dropped and its row freed"
    )
    max_num_batched_tokens: int = Field(
        512, ge=16, description="tokens (decode + prompt chunks) one engine step runs in one forward"
    )
    chat_template: Path | None = Field(
        None,
        description="a Jinja chat template file for /v1/chat/completions, used instead of the "
        "tokenizer's own (without either, chat requests get 400)",
    )

    @field_validator("data_dir", "admin_token_file", "chat_template", mode="after")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        """Resolved once, here: nothing downstream (the Redis child included) depends on the cwd."""
        return None if path is None else path.expanduser().resolve()

    @field_validator("model", mode="after")
    @classmethod
    def _absolute_model_dir(cls, model: str | None) -> str | None:
        """A local model directory becomes absolute; anything else is a hub id and stays as given."""
        if model is None:
            return None
        path = Path(model).expanduser()
        if path.exists() or model.startswith((".", "/", "~")):
            return str(path.resolve())
        return model

    def resolve_admin_token(self) -> tuple[str, bool]:
        """(token, is_new): the flag/env token, else --admin-token-file, else the one saved under
        the data dir, else a new one saved there (created 0600, never readable by others)."""
        if self.admin_token:
            return self.admin_token, False
        if self.admin_token_file is not None:
            return self.admin_token_file.read_text().strip(), False
        path = self.data_dir / "admin_token"
        if path.exists():
            return path.read_text().strip(), False
        token = secrets.token_urlsafe(24)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(token + "\n")
        return token, True
