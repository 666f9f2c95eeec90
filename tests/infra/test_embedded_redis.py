"""EmbeddedRedis: a real child redis-server that persists under the data dir."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import stat
from pathlib import Path

import pytest
import redis
import redis.exceptions

from infra.embedded_redis import DENIED_COMMANDS, EmbeddedRedis, find_redis_server, free_port
from prefix_store.redis_store import RedisPrefixStore, connect


def _put(url: str, data: bytes) -> None:
    async def body() -> None:
        async with connect(url) as client:
            await RedisPrefixStore(client, "fp").put("acme:t", data, 3, "float32")

    asyncio.run(body())


def _get(url: str) -> bytes | None:
    async def body() -> bytes | None:
        async with connect(url) as client:
            got = await RedisPrefixStore(client, "fp").get("acme:t")
            return got[1] if got is not None else None

    return asyncio.run(body())


def _is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_value_survives_stop_and_start_on_same_data_dir(tmp_path: Path) -> None:
    embedded = EmbeddedRedis(tmp_path)
    url = embedded.start()
    try:
        match = re.fullmatch(r"redis://:[\w-]{40,}@127\.0\.0\.1:(\d+)/0", url)
        assert match is not None
        port, pid = int(match.group(1)), embedded.pid
        assert pid is not None and embedded.start() == url  # start() is idempotent
        _put(url, b"kept across restarts")
        embedded.stop()
        assert _is_gone(pid)
        assert not _accepts(port)
        embedded.stop()  # idempotent

        url = embedded.start()
        assert embedded.pid != pid
        assert _get(url) == b"kept across restarts"
        assert (tmp_path / "redis" / "appendonly.aof").exists()
    finally:
        embedded.stop()


def test_second_instance_on_same_data_dir_is_refused(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path)
    first.start()
    try:
        with pytest.raises(RuntimeError, match="another process"):
            EmbeddedRedis(tmp_path).start()
    finally:
        first.stop()
    second = EmbeddedRedis(tmp_path)  # the lock is released once the first one stops
    second.start()
    second.stop()


def test_busy_port_falls_back_to_a_free_one(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        embedded = EmbeddedRedis(tmp_path, port=port)
        url = embedded.start()
        try:
            assert not url.endswith(f"@127.0.0.1:{port}/0")
            assert _get(url) is None
        finally:
            embedded.stop()


def test_failed_start_reports_log_tail_and_releases_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    command = EmbeddedRedis._command
    monkeypatch.setattr(
        EmbeddedRedis, "_command", lambda self, binary, port: [*command(self, binary, port), "--bogus", "1"]
    )
    with pytest.raises(RuntimeError, match="(?i)bogus"):
        EmbeddedRedis(tmp_path).start()
    monkeypatch.undo()
    embedded = EmbeddedRedis(tmp_path)
    embedded.start()
    embedded.stop()


def test_helpers() -> None:
    assert os.access(find_redis_server(), os.X_OK)
    port = free_port()
    assert 0 < port < 65536 and not _accepts(port)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_only_the_password_holder_gets_in_and_never_to_dangerous_commands(tmp_path: Path) -> None:
    """Issue 12, finding 7: no password and `CONFIG SET dir` made Redis write files for anyone local."""
    embedded = EmbeddedRedis(tmp_path)
    url = embedded.start()
    try:
        password = (tmp_path / "redis" / "password").read_text().strip()
        assert f":{password}@" in url and password not in embedded.public_url()
        with redis.Redis.from_url(embedded.public_url()) as anonymous:
            with pytest.raises(redis.exceptions.AuthenticationError):
                anonymous.set("x", "y")
        with redis.Redis.from_url(url) as client:
            assert client.set("x", "y") and client.get("x") == b"y"
            for command in (
                ["CONFIG", "SET", "dir", str(tmp_path)],
                ["CONFIG", "GET", "dir"],
                ["DEBUG", "SLEEP", "0"],
                ["MODULE", "LIST"],
                ["SLAVEOF", "127.0.0.1", "1"],
                ["REPLICAOF", "127.0.0.1", "1"],
                ["ACL", "SETUSER", "default", "+@all"],
            ):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    client.execute_command(*command)
        assert {c.upper() for c in DENIED_COMMANDS} >= {"CONFIG", "DEBUG", "MODULE", "SLAVEOF", "REPLICAOF"}
        for process_args in Path(f"/proc/{embedded.pid}/cmdline").read_bytes().split(b"\0"):
            assert password.encode() not in process_args  # never visible in `ps`
    finally:
        embedded.stop()
    embedded.start()  # the saved password is used again after a restart
    try:
        with redis.Redis.from_url(url) as client:
            assert client.get("x") == b"y"
    finally:
        embedded.stop()


def test_data_dir_is_0700_and_files_0600_even_if_they_were_wider(tmp_path: Path) -> None:
    data = tmp_path / "redis"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    old = data / "appendonly.aof"
    old.write_bytes(b"")
    old.chmod(0o644)
    embedded = EmbeddedRedis(tmp_path)
    url = embedded.start()
    try:
        _put(url, b"private")
    finally:
        embedded.stop()
    assert _mode(data) == 0o700
    files = [path for path in data.rglob("*") if path.is_file()]
    assert {"password", "redis.conf", "redis.log", "embedded.lock"} <= {path.name for path in files}
    assert any(path.name.startswith("appendonly") and path.stat().st_size > 0 for path in files)
    assert {path.name: _mode(path) for path in files} == {path.name: 0o600 for path in files}
    assert all(_mode(path) == 0o700 for path in data.rglob("*") if path.is_dir())


def test_redis_runs_in_its_own_session_so_a_terminal_ctrl_c_reaches_only_the_server(tmp_path: Path) -> None:
    """Ctrl-C signals the terminal's whole process group: were Redis in it, it would die mid-drain
    and the supervisor would restart it while the server shuts down."""
    embedded = EmbeddedRedis(tmp_path)
    embedded.start()
    try:
        assert embedded.pid is not None
        assert os.getpgid(embedded.pid) != os.getpgid(0) and os.getsid(embedded.pid) == embedded.pid
    finally:
        embedded.stop()
