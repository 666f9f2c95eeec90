"""`prefix-serve --model <hub id>` as a user runs it: the model comes from the local Hugging Face
cache under `HF_HOME` (offline, never downloaded), and code a model ships runs only when asked.

The hub endpoint points at an address that never answers, so any attempt to reach the network
would hang for seconds: the refusals must come at once, one line, exit status 2.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from infra.embedded_redis import free_port
from tests.server_process import ROOT, ServerProcess, clean_env, upload_adapter
from tests.tiny_families import (
    REMOTE_CODE_FILE,
    place_in_hub_cache,
    save_family_model,
    save_remote_code_model,
)
from tests.tiny_models import Oracle, save_adapter

REPO_ID = "acme/tiny-remote"
NO_NETWORK = {"HF_ENDPOINT": "http://10.255.255.1"}  # unroutable: a connection attempt would hang
MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF_HOME whose hub cache holds REPO_ID: the remote-code twin of the llama-2 model of seed 4."""
    root = tmp_path_factory.mktemp("hf")
    place_in_hub_cache(save_remote_code_model(root / "remote", seed=4), root / "home", REPO_ID)
    return root / "home"


def _refusal(tmp_path: Path, hf_home: Path, *flags: str) -> str:
    """Run prefix-serve with `flags`; it must exit 2 within seconds with one line on stderr."""
    command = [sys.executable, "-m", "server", "--port", str(free_port()), "--data-dir", str(tmp_path / "d")]
    env = clean_env({"HF_HOME": str(hf_home), **NO_NETWORK})
    started = time.monotonic()
    done = subprocess.run(
        command + list(flags), cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert time.monotonic() - started < 30, "a refusal must not wait on the network"
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prefix-serve: error: "), done.stderr
    return lines[0]


def test_uncached_ids_and_untrusted_code_are_refused_at_once(tmp_path: Path, hf_home: Path) -> None:
    line = _refusal(tmp_path, hf_home, "--model", "acme/not-downloaded")
    assert "not in the Hugging Face cache" in line and str(hf_home / "hub") in line
    assert "point --model at a local directory" in line
    line = _refusal(tmp_path, hf_home, "--model", REPO_ID)
    assert f"ships its own code ({REMOTE_CODE_FILE}" in line and "--trust-remote-code true" in line


def test_a_cached_id_loads_offline_and_trusted_code_is_logged(tmp_path: Path, hf_home: Path) -> None:
    """Served by its hub id from HF_HOME with --trust-remote-code true: the start-up log says the
    model's own code runs, and a PEFT adapter made on the plain Llama twin gives PEFT's tokens."""
    twin = save_family_model("llama-2", tmp_path / "twin", seed=4)  # the same weights, built-in class
    adapter = save_adapter(twin, tmp_path / "adapter", 5, seed=8)
    prompt = [5, 40, 77, 120, 300, 9, 18]
    expected, margin = Oracle(twin, adapter).greedy(prompt, MAX_NEW_TOKENS)
    assert margin > 1e-3
    env = {"HF_HOME": str(hf_home), **NO_NETWORK}
    flags = ["--model", REPO_ID, "--trust-remote-code", "true"]
    with ServerProcess(tmp_path / "data", *flags, env=env) as server, httpx.Client(timeout=60) as client:
        log = server.log_tail(20000)
        assert f"--trust-remote-code: running the code model {REPO_ID} ships ({REMOTE_CODE_FILE})" in log
        assert "from " + str(hf_home / "hub" / "models--acme--tiny-remote" / "snapshots") in log
        assert upload_adapter(client, server, "t:remote", adapter.weights, adapter.config).status_code == 201
        body = {
            "task_id": "t:remote",
            "input_ids": prompt,
            "max_new_tokens": MAX_NEW_TOKENS,
            "ignore_eos": True,
        }
        response = client.post(server.url + "/generate", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["token_ids"] == expected
