"""Flags, env `PREFIX_SERVE_*` and the two documented aliases."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import parse_args


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_URL", "PREFIX_ADMIN_TOKEN", "PREFIX_SERVE_PORT", "ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    settings = parse_args([])
    assert (settings.host, settings.port, settings.device, settings.dtype) == (
        "127.0.0.1",
        8000,
        "auto",
        "auto",
    )
    assert (
        settings.model is None and settings.redis_url is None and settings.data_dir == Path.cwd() / "data"
    )  # resolved once, at start-up


def test_env_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFIX_SERVE_PORT", "9001")
    monkeypatch.setenv("PREFIX_SERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("REDIS_URL", "redis://example:6379/0")
    monkeypatch.setenv("PREFIX_ADMIN_TOKEN", "from-env")
    monkeypatch.setenv("ADMIN_TOKEN", "not-this-one")
    settings = parse_args(["--max-batch-size", "3", "--dtype", "bfloat16"])
    assert (settings.port, settings.max_batch_size, settings.dtype) == (9001, 3, "bfloat16")
    assert settings.redis_url == "redis://example:6379/0" and settings.admin_token == "from-env"
    assert parse_args(["--redis-url", "redis://flag:1/0"]).redis_url == "redis://flag:1/0"


def test_bad_flag_values_are_rejected() -> None:
    with pytest.raises(ValueError):
        parse_args(["--device", "tpu"])
    with pytest.raises(ValueError):
        parse_args(["--max-batch-size", "0"])


def test_admin_token_is_generated_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFIX_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("PREFIX_SERVE_ADMIN_TOKEN", raising=False)
    settings = parse_args(["--data-dir", str(tmp_path)])
    token, is_new = settings.resolve_admin_token()
    assert is_new and len(token) >= 24 and settings.resolve_admin_token() == (token, False)
    assert (tmp_path / "admin_token").read_text().strip() == token
    assert (tmp_path / "admin_token").stat().st_mode & 0o077 == 0


def test_admin_token_file_is_read_and_never_rewritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PREFIX_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("PREFIX_SERVE_ADMIN_TOKEN", raising=False)
    (tmp_path / "token").write_text("s3cret-token\n")
    settings = parse_args(["--data-dir", str(tmp_path / "d"), "--admin-token-file", str(tmp_path / "token")])
    assert settings.resolve_admin_token() == ("s3cret-token", False)
    assert not (tmp_path / "d" / "admin_token").exists()


def test_paths_are_absolute_whatever_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model").mkdir()
    settings = parse_args(["--model", "my-model", "--admin-token-file", "tok"])
    assert settings.data_dir == tmp_path / "data"
    assert settings.admin_token_file == tmp_path / "tok"
    assert settings.model == str(tmp_path / "my-model")
    assert parse_args(["--model", "Qwen/Qwen2.5-0.5B"]).model == "Qwen/Qwen2.5-0.5B"  # a hub id stays
