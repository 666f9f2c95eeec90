"""Where `--model`'s files are and whether it ships code to run, decided before anything heavy loads.

A local directory is used as is. A hub id is looked up in the local Hugging Face cache
(`HF_HOME` / `HF_HUB_CACHE` honoured) and never downloaded unless the environment says
`HF_HUB_OFFLINE=0`: a server that quietly fetches gigabytes, or hangs retrying a hub it cannot
reach, is worse than one that says at once what to do. A model whose `config.json` maps its
classes to Python files it ships (`auto_map`) runs that code only with `--trust-remote-code true`.

Imports no torch: the CLI runs `locate_model` before the model loads, to refuse in one line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

TRUST_FLAG = "--trust-remote-code true (or PREFIX_SERVE_TRUST_REMOTE_CODE=true)"
_CODE_CLASSES = ("AutoConfig", "AutoModelForCausalLM")  # what the server instantiates
_FALSE = ("0", "false", "no", "off")


class ModelSourceError(Exception):
    """`--model` cannot be served as given; the one-line message says what to change."""


@dataclass(frozen=True)
class ModelSource:
    """A model located: what to hand `from_pretrained`, and the code it ships."""

    name: str  # --model as given
    location: str  # a local directory, or the hub id itself when downloads are allowed
    config: dict[str, Any]  # its config.json
    code_files: tuple[str, ...]  # .py files its auto_map names for the config/causal-LM classes
    is_offline: bool  # nothing may be fetched: from_pretrained gets local_files_only

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type") or "")


def downloads_allowed() -> bool:
    """Only an explicit `HF_HUB_OFFLINE=0` (false/no/off) lets the server fetch from the hub."""
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() in _FALSE


def locate_model(model: str, trust_remote_code: bool) -> ModelSource:
    """Find `model` (a local directory or a hub id) and check that it may be loaded as asked.

    Raises ModelSourceError: not found (offline), no config.json, or it needs code the user
    has not allowed.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        source = _local(model, path)
    elif model.startswith((".", "/", "~")):
        raise ModelSourceError(f"--model {model}: no such directory")
    elif downloads_allowed():
        source = _from_hub(model)
    else:
        source = _local(model, _cached_snapshot(model))
    _check_code(source, trust_remote_code)
    return source


def _check_code(source: ModelSource, trust_remote_code: bool) -> None:
    """Built-in transformers code for its model type, or its own code and the user's consent."""
    if not source.model_type or is_builtin_model_type(source.model_type):
        return  # (no model_type: transformers guesses from the name, or says why it cannot)
    if not source.code_files:
        raise ModelSourceError(
            f"model {source.name}: transformers {_transformers_version()} has no model type "
            f"'{source.model_type}' (config.json) and the checkpoint ships no code for it; "
            f"a newer transformers may know it"
        )
    if not trust_remote_code:
        raise ModelSourceError(
            f"model {source.name} ships its own code ({', '.join(source.code_files)}, named by auto_map "
            f"in config.json) and the server runs no model code unless told to: "
            f"read it, then pass {TRUST_FLAG}"
        )


def is_builtin_model_type(model_type: str) -> bool:
    """transformers has its own implementation of this model type (it then needs no shipped code)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES  # heavy: only when asked

    return model_type in CONFIG_MAPPING_NAMES


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def _local(model: str, path: Path) -> ModelSource:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(
            f"--model {model}: {path} has no config.json; point --model at a directory made by "
            f"save_pretrained (config.json, the weights, the tokenizer files)"
        )
    config = _read_config(config_path)
    return ModelSource(model, str(path), config, _code_files(config), is_offline=True)


def _cached_snapshot(model: str) -> Path:
    """The newest cached snapshot of hub id `model`, without touching the network."""
    try:
        return Path(snapshot_download(model, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):
        raise ModelSourceError(
            f"--model {model}: no such local directory, and not in the Hugging Face cache "
            f"({hub_constants.HF_HUB_CACHE}; set by HF_HOME or HF_HUB_CACHE) and the server does not "
            f"download: point --model at a local directory holding config.json, the weights and the "
            f"tokenizer (e.g. `hf download {model} --local-dir <dir>`), "
            f"or allow downloads with HF_HUB_OFFLINE=0"
        ) from None


def _from_hub(model: str) -> ModelSource:
    """Downloads allowed: fetch config.json only, so that the code check comes before the weights."""
    try:
        config_path = Path(hf_hub_download(model, "config.json"))
    except Exception as exc:  # any hub failure (no network, no such repo, gated) ends the start-up
        raise ModelSourceError(
            f"--model {model}: cannot fetch its config.json from the hub ({exc})"
        ) from None
    config = _read_config(config_path)
    return ModelSource(model, model, config, _code_files(config), is_offline=False)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ModelSourceError(f"{path} is not a JSON object")
    return config


def _code_files(config: dict[str, Any]) -> tuple[str, ...]:
    """`auto_map` values look like `modeling_x.XForCausalLM` or `org/repo--modeling_x.XForCausalLM`."""
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict):
        return ()
    refs = [auto_map[name] for name in _CODE_CLASSES if isinstance(auto_map.get(name), str)]
    return tuple(sorted({ref.rsplit(".", 1)[0] + ".py" for ref in refs}))
