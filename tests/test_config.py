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
    assert settings.model is None and settings.redis_url is None and settings.data_dir == Path("data")


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
    token = settings.resolve_admin_token()
    assert len(token) >= 24 and settings.resolve_admin_token() == token
    assert (tmp_path / "admin_token").read_text().strip() == token
