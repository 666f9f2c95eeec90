"""`prefixctl` run in-process (typer's CliRunner) against a real server over the tiny GPT-2."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner, Result

from clients import PrefixClient, cli, cli_prefixes
from infra.embedded_redis import free_port
from tests.clients import canonical_prefix, running_server
from tests.server_process import ServerProcess
from tests.tiny_models import Adapter, save_adapter


@pytest.fixture(scope="module")
def server(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(gpt2_dir, tmp_path_factory.mktemp("cli-server") / "data") as proc:
        yield proc


Invoke = Callable[..., Result]


@pytest.fixture
def run(server: ServerProcess) -> Invoke:
    """`run(*args)` invokes prefixctl with PREFIX_URL / PREFIX_ADMIN_TOKEN pointing at the server."""
    runner = CliRunner()
    env = {"PREFIX_URL": server.url, "PREFIX_ADMIN_TOKEN": server.admin_token, "COLUMNS": "200"}

    def invoke(*args: str, **extra_env: str) -> Result:
        return runner.invoke(cli.app, list(args), env={**env, **extra_env})

    return invoke


@pytest.fixture
def prefix_client(server: ServerProcess) -> Iterator[PrefixClient]:
    with PrefixClient(server.url, server.admin_token, timeout=60) as c:
        yield c


def _ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def _stdout(result: Result) -> str:
    """Exactly what was printed (`Result.stdout` turns `\\r\\n` into `\\n`)."""
    return _ok(result).stdout_bytes.decode()


def test_upload_file_and_peft(run: Invoke, adapter: Adapter, tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    path.write_bytes(canonical_prefix(3))
    info = json.loads(_ok(run("upload", "cli:file", str(path))).stdout)
    assert (info["task_id"], info["prefix_len"], info["dtype"]) == ("cli:file", 3, "float32")
    peft = json.loads(_ok(run("upload", "cli:peft", str(adapter.path))).stdout)
    assert peft["prefix_len"] == adapter.num_virtual_tokens
    weights, config = adapter.path / "adapter_model.safetensors", adapter.path / "adapter_config.json"
    again = json.loads(_ok(run("upload", "cli:peft", str(weights), "--config", str(config))).stdout)
    assert again["version"] == peft["version"] + 1


def test_upload_a_cartridge_and_generate_on_it(run: Invoke, gpt2_dir: Path, tmp_path: Path) -> None:
    """A PEFT CARTRIDGE folder, as `prefix-train --method cartridge` or PEFT writes it."""
    cartridge = save_adapter(gpt2_dir, tmp_path / "cartridge", 6, seed=5, peft_type="CARTRIDGE")
    info = json.loads(_ok(run("upload", "cli:cartridge", str(cartridge.path))).stdout)
    assert (info["prefix_len"], info["source"]) == (6, "cartridge")
    answer = run("generate", "cli:cartridge", "hi", "--max-new-tokens", "3", "--ignore-eos", "--json")
    assert len(json.loads(_ok(answer).stdout)["token_ids"]) == 3


def test_upload_shows_progress_above_the_threshold(
    run: Invoke, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_prefixes, "PROGRESS_MIN_BYTES", 0)
    path = tmp_path / "big.safetensors"
    path.write_bytes(canonical_prefix(200))
    info = json.loads(_ok(run("upload", "cli:big", str(path))).stdout)  # the bar is on stderr
    assert info["prefix_len"] == 200


def test_upload_text(run: Invoke) -> None:
    info = json.loads(_ok(run("upload", "cli:text", "--text", "Answer briefly.")).stdout)
    assert info["task_id"] == "cli:text" and info["prefix_len"] > 0


def test_upload_text_file(run: Invoke, tmp_path: Path) -> None:
    text_file = tmp_path / "system.txt"
    text_file.write_text("Réponds en français.", encoding="utf-8")
    info = json.loads(_ok(run("upload", "cli:text-file", "--text-file", str(text_file))).stdout)
    assert info["task_id"] == "cli:text-file" and info["prefix_len"] > 0


def test_upload_usage_errors(run: Invoke, adapter: Adapter, tmp_path: Path) -> None:
    both = run("upload", "cli:x", str(adapter.path), "--text", "hi")
    assert both.exit_code == 2 and "exactly one of PATH" in both.stderr
    assert run("upload", "cli:x").exit_code == 2
    (tmp_path / "adapter_config.json").write_text("{}")
    not_peft = run("upload", "cli:x", str(tmp_path))
    assert not_peft.exit_code == 2 and "adapter_model.safetensors" in not_peft.stderr
    assert run("upload", "cli:x", str(tmp_path / "absent.safetensors")).exit_code == 2


def test_list_show_warm_delete(run: Invoke, prefix_client: PrefixClient) -> None:
    for i in range(3):
        prefix_client.upload(f"ls:{i}", canonical_prefix(2, seed=i))
    table = _ok(run("list")).stdout
    assert all(f"ls:{i}" in table for i in range(3)) and "prefix_len" in table
    one = _ok(run("list", "--limit", "1", "--json"))
    page = json.loads(one.stdout)
    assert len(page["items"]) == 1 and page["next_cursor"] is not None
    every = json.loads(_ok(run("list", "--limit", "1", "--all", "--json")).stdout)
    ids = [item["task_id"] for item in every["items"]]
    assert {"ls:0", "ls:1", "ls:2"} <= set(ids) and every["next_cursor"] is None
    assert len(ids) == len(set(ids))

    shown = json.loads(_ok(run("show", "ls:1")).stdout)
    assert shown["task_id"] == "ls:1" and shown["version"] == prefix_client.get("ls:1").version
    warmed = json.loads(_ok(run("warm", "ls:1")).stdout)
    assert warmed["task_id"] == "ls:1" and warmed["tiers"]

    assert _ok(run("delete", "ls:1")).stdout.strip() == "deleted ls:1"
    gone = run("show", "ls:1")
    assert gone.exit_code == 1 and gone.stderr.startswith("error unknown_task: ")


def test_generate_plain_json_and_stream(
    run: Invoke, prefix_client: PrefixClient, server: ServerProcess
) -> None:
    prefix_client.upload("cli:gen", canonical_prefix(4))
    args = ("generate", "cli:gen", "Hello", "--max-new-tokens", "10", "--ignore-eos")
    expected = prefix_client.generate("cli:gen", "Hello", max_new_tokens=10, ignore_eos=True)
    assert _stdout(run(*args)) == expected.text + "\n"
    assert _stdout(run(*args, "--stream")) == expected.text + "\n"

    whole = json.loads(_ok(run(*args, "--json")).stdout)
    body = {"task_id": "cli:gen", "prompt": "Hello", "max_new_tokens": 10, "ignore_eos": True}
    raw = httpx.post(server.url + "/generate", json=body, timeout=60).json()
    assert {**whole, "id": None} == {**raw, "id": None}

    lines = _ok(run(*args, "--stream", "--json")).stdout.splitlines()
    events = [json.loads(line) for line in lines]
    assert [t for e in events for t in e["token_ids"]] == raw["token_ids"]
    assert events[-1]["finish_reason"] == "length" and events[-1]["usage"] == raw["usage"]

    sampled = ("--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3", "--stop", "a")
    expected = prefix_client.generate(
        "cli:gen", "Hello", max_new_tokens=10, temperature=0.8, top_k=20, top_p=0.9, seed=3, stop=["a"]
    )
    assert _stdout(run("generate", "cli:gen", "Hello", "--max-new-tokens", "10", *sampled)) == (
        expected.text + "\n"
    )


def test_server_errors_exit_1_with_the_code(run: Invoke) -> None:
    unknown = run("generate", "cli:absent", "Hi")
    assert unknown.exit_code == 1
    assert unknown.stderr.startswith("error unknown_task: ") and unknown.stdout == ""
    assert run("generate", "cli:absent", "Hi", "--stream").stderr.startswith("error unknown_task: ")
    invalid = run("generate", "cli:absent", "Hi", "--top-p", "0")
    assert invalid.exit_code == 1 and invalid.stderr.startswith("error invalid_request: ")
    assert run("delete", "cli:absent").stderr.startswith("error unknown_task: ")
    forbidden = run("list", PREFIX_ADMIN_TOKEN="wrong")
    assert forbidden.exit_code == 1 and forbidden.stderr.startswith("error forbidden: ")
    unreachable = run("list", PREFIX_URL=f"http://127.0.0.1:{free_port()}")
    assert unreachable.exit_code == 1 and unreachable.stderr.startswith("error connection_failed: ")


def test_url_and_token_flags_override_env(run: Invoke, server: ServerProcess) -> None:
    listed = run(
        "--url", server.url, "--token", server.admin_token, "list", "--json", PREFIX_URL="http://x:1"
    )
    assert "items" in json.loads(_ok(listed).stdout)


def test_chat_plain_streamed_and_json(run: Invoke, prefix_client: PrefixClient) -> None:
    prefix_client.upload("cli:chat", canonical_prefix(4, seed=9))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    expected = prefix_client.chat("cli:chat", messages, max_tokens=8, temperature=0, repetition_penalty=1.2)
    args = ("chat", "cli:chat", "Hi there", "--system", "Be brief.", "--max-tokens", "8")
    args += ("--temperature", "0", "--repetition-penalty", "1.2")
    assert _stdout(run(*args)) == expected.content + "\n"
    assert _stdout(run(*args, "--stream")) == expected.content + "\n"
    whole = json.loads(_ok(run(*args, "--json")).stdout)
    assert whole["content"] == expected.content and whole["completion_tokens"] == expected.completion_tokens
