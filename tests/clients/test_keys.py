"""Tenant API keys from the Python clients and `prefixctl`, against a real server.

Creating a key switches its Redis into key mode for good, so this module's server has its own
throwaway Redis (`running_server`), shared with no other module.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from clients import AsyncPrefixClient, CreatedKey, KeyInfo, PrefixClient, PrefixServerError, Sampling, cli
from tests.clients import canonical_prefix, running_server
from tests.server_process import ServerProcess

GEN = Sampling(max_new_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def server(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Two tasks, `acme:a` and `other:b`; in key mode (closed) whichever test runs first."""
    with running_server(gpt2_dir, tmp_path_factory.mktemp("keys-server") / "data") as proc:
        with PrefixClient(proc.url, proc.admin_token, timeout=60) as admin:
            admin.upload("acme:a", canonical_prefix(3))
            admin.upload("other:b", canonical_prefix(2, seed=1))
            with PrefixClient(proc.url, timeout=60) as anonymous:  # development mode: open
                assert anonymous.generate("acme:a", "Hi", max_new_tokens=1).completion_tokens == 1
            admin.create_key("bootstrap", ["*"])
        yield proc


@pytest.fixture
def admin(server: ServerProcess) -> Iterator[PrefixClient]:
    with PrefixClient(server.url, server.admin_token, timeout=60) as client:
        yield client


def _error(call: Callable[[], object]) -> PrefixServerError:
    with pytest.raises(PrefixServerError) as caught:
        call()
    return caught.value


def _status_and_code(call: Callable[[], object]) -> tuple[int, str]:
    error = _error(call)
    return error.status, error.code


def test_create_list_revoke_round_trip(admin: PrefixClient, server: ServerProcess) -> None:
    created = admin.create_key("acme", ["acme:*", "other:b"], requests_per_second=5, tokens_per_minute=20000)
    assert isinstance(created, CreatedKey) and created.id.startswith("key_") and created.key
    assert (created.name, created.scopes, created.requests_per_second, created.tokens_per_minute) == (
        "acme",
        ("acme:*", "other:b"),
        5.0,
        20000,
    )
    assert created.key not in repr(created) and created.created_at
    info = created.info
    assert type(info) is KeyInfo and info.id == created.id and not hasattr(info, "key")

    listed = admin.list_keys()
    assert all(type(k) is KeyInfo for k in listed) and info in listed
    assert {k.name for k in listed} >= {"bootstrap", "acme"}

    with PrefixClient(server.url, api_key=created.key, timeout=60) as tenant:
        assert tenant.generate("acme:a", "Hi", **GEN).completion_tokens == 4
        assert admin.revoke_key(created.id) == info
        assert _status_and_code(lambda: tenant.generate("acme:a", "Hi")) == (401, "unauthorized")
    assert created.id not in {k.id for k in admin.list_keys()}
    gone = _error(lambda: admin.revoke_key(created.id))
    assert (gone.status, gone.code) == (404, "unknown_key") and created.id in gone.message

    assert _status_and_code(lambda: admin.create_key("bad", ["no spaces"])) == (422, "invalid_request")
    assert _status_and_code(lambda: admin.create_key("none", [])) == (422, "invalid_request")
    assert _status_and_code(lambda: admin.revoke_key("not-a-key-id")) == (422, "invalid_request")
    with pytest.raises(TypeError, match="acme"):
        admin.create_key("str", "acme:*")
    with PrefixClient(server.url, api_key=created.key) as not_admin:  # keys never go to admin routes
        assert _status_and_code(not_admin.list_keys) == (401, "unauthorized")
    with PrefixClient(server.url, "wrong") as wrong:
        assert _status_and_code(lambda: wrong.create_key("x", ["*"])) == (403, "forbidden")


def test_generation_sends_the_api_key(admin: PrefixClient, server: ServerProcess) -> None:
    secret = admin.create_key("acme-gen", ["acme:*"]).key
    expected = admin.generate("acme:a", "Hello", **GEN)  # the admin token as a key
    with PrefixClient(server.url, api_key=secret, timeout=60) as tenant:
        assert tenant.generate("acme:a", "Hello", **GEN).token_ids == expected.token_ids
        events = list(tenant.stream("acme:a", "Hello", **GEN))
        assert tuple(t for e in events for t in e.token_ids) == expected.token_ids
        assert _status_and_code(lambda: tenant.generate("other:b", "Hi")) == (403, "forbidden")
        assert _status_and_code(lambda: tenant.generate("other:absent", "Hi")) == (403, "forbidden")
        assert _status_and_code(lambda: list(tenant.stream("other:b", "Hi"))) == (403, "forbidden")
    with PrefixClient(server.url, timeout=60) as anonymous:
        unauthorized = _error(lambda: anonymous.generate("acme:a", "Hi"))
        assert (unauthorized.status, unauthorized.code) == (401, "unauthorized")
        assert _status_and_code(lambda: list(anonymous.stream("acme:a", "Hi"))) == (401, "unauthorized")
    with PrefixClient(server.url, server.admin_token, timeout=60, api_key=secret) as both:
        assert both.list().items  # admin calls keep the admin token ...
        assert _status_and_code(lambda: both.generate("other:b", "Hi")) == (403, "forbidden")  # ... not here
    assert admin.generate("other:b", "Hi", max_new_tokens=1).task_id == "other:b"  # admin: every task


def test_rate_limited_carries_retry_after(admin: PrefixClient, server: ServerProcess) -> None:
    secret = admin.create_key("slow", ["acme:a"], requests_per_second=0.01).key  # 1 request, then 100 s
    with PrefixClient(server.url, api_key=secret, timeout=60) as tenant:
        tenant.generate("acme:a", "Hi", max_new_tokens=1)
        limited = _error(lambda: tenant.generate("acme:a", "Hi", max_new_tokens=1))
    assert (limited.status, limited.code) == (429, "rate_limited")
    assert limited.retry_after is not None and limited.retry_after >= 1


def test_async_client_keys(server: ServerProcess) -> None:
    async def scenario() -> None:
        async with AsyncPrefixClient(server.url, server.admin_token, timeout=60) as admin:
            created = await admin.create_key("async", ["acme:a"], tokens_per_minute=1000)
            assert created.tokens_per_minute == 1000 and created.scopes == ("acme:a",)
            assert created.info in await admin.list_keys()
            expected = await admin.generate("acme:a", "Hey", **GEN)
            async with AsyncPrefixClient(server.url, api_key=created.key, timeout=60) as tenant:
                whole = await tenant.generate("acme:a", "Hey", **GEN)
                assert whole.token_ids == expected.token_ids
                events = [e async for e in tenant.stream("acme:a", "Hey", **GEN)]
                assert tuple(t for e in events for t in e.token_ids) == expected.token_ids
                with pytest.raises(PrefixServerError) as forbidden:
                    await tenant.generate("other:b", "Hi")
                assert (forbidden.value.status, forbidden.value.code) == (403, "forbidden")
                assert await admin.revoke_key(created.id) == created.info
                with pytest.raises(PrefixServerError) as revoked:
                    async for _ in tenant.stream("acme:a", "Hi"):
                        pass
                assert (revoked.value.status, revoked.value.code) == (401, "unauthorized")
            with pytest.raises(PrefixServerError) as unknown:
                await admin.revoke_key(created.id)
            assert unknown.value.code == "unknown_key"
        async with AsyncPrefixClient(server.url, timeout=60) as anonymous:
            with pytest.raises(PrefixServerError) as unauthorized:
                await anonymous.generate("acme:a", "Hi")
            assert (unauthorized.value.status, unauthorized.value.code) == (401, "unauthorized")

    asyncio.run(scenario())


Invoke = Callable[..., Result]


@pytest.fixture
def run(server: ServerProcess) -> Invoke:
    """`run(*args, VAR=value)` runs prefixctl at the server with the admin token; None unsets VAR."""
    runner = CliRunner()
    env = {"PREFIX_URL": server.url, "PREFIX_ADMIN_TOKEN": server.admin_token, "COLUMNS": "250"}

    def invoke(*args: str, **extra_env: str | None) -> Result:
        return runner.invoke(cli.app, list(args), env={"PREFIX_API_KEY": None, **env, **extra_env})

    return invoke


def _ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def _fails(result: Result, exit_code: int, stderr_start: str = "") -> None:
    assert result.exit_code == exit_code, (result.stdout, result.stderr, result.exception)
    assert result.stderr.startswith(stderr_start), result.stderr


def test_cli_keys_create_list_revoke(run: Invoke) -> None:
    args = ("keys", "create", "cli-tenant", "--scope", "acme:*", "--scope", "other:b", "--rps", "5")
    created = _ok(run(*args, "--tpm", "20000"))
    key = json.loads(created.stdout)
    assert key["key"] and key["id"].startswith("key_") and key["name"] == "cli-tenant"
    assert (key["scopes"], key["requests_per_second"], key["tokens_per_minute"]) == (
        ["acme:*", "other:b"],
        5.0,
        20000,
    )
    warning = created.stderr.strip()
    assert "\n" not in warning and warning.startswith("warning:") and "only" in warning

    table = _ok(run("keys", "list")).stdout
    assert key["id"] in table and "cli-tenant" in table and "acme:* other:b" in table
    assert "tokens_per_minute" in table and "unlimited" in table  # the bootstrap key's limits
    listed = json.loads(_ok(run("keys", "list", "--json")).stdout)["items"]
    mine = [k for k in listed if k["id"] == key["id"]]
    assert mine == [{k: v for k, v in key.items() if k != "key"}]
    assert all("key" not in k for k in listed)

    assert _ok(run("keys", "revoke", key["id"])).stdout == f"revoked {key['id']} (cli-tenant)\n"
    assert key["id"] not in _ok(run("keys", "list")).stdout
    _fails(run("keys", "revoke", key["id"]), 1, "error unknown_key: ")
    _fails(run("keys", "revoke", "nope"), 1, "error invalid_request: ")
    _fails(run("keys", "create", "x", "--scope", "bad scope"), 1, "error invalid_request: ")
    _fails(run("keys", "list", PREFIX_ADMIN_TOKEN="wrong"), 1, "error forbidden: ")
    _fails(run("keys", "list", PREFIX_ADMIN_TOKEN=None), 1, "error unauthorized: ")
    _fails(run("keys", "create", "x"), 2)  # --scope is required
    _fails(run("keys", "create", "x", "--scope", "*", "--rps", "-1"), 2)
    usage = run("keys")  # no sub-command: the group's help
    assert usage.exit_code in (0, 2) and "revoke" in usage.stdout


def test_cli_generate_with_api_key(run: Invoke, admin: PrefixClient) -> None:
    secret = admin.create_key("cli-gen", ["acme:*"]).key
    expected = admin.generate("acme:a", "Hello", max_new_tokens=6, ignore_eos=True).text + "\n"
    gen = ("generate", "acme:a", "Hello", "--max-new-tokens", "6", "--ignore-eos")
    no_admin = {"PREFIX_ADMIN_TOKEN": None}
    assert _ok(run("--api-key", secret, *gen, **no_admin)).stdout_bytes.decode() == expected
    assert _ok(run(*gen, "--stream", PREFIX_API_KEY=secret, **no_admin)).stdout_bytes.decode() == expected
    assert _ok(run(*gen)).stdout_bytes.decode() == expected  # the admin token works as a key

    _fails(run(*gen, **no_admin), 1, "error unauthorized: ")
    _fails(run("--api-key", "pk-wrong", *gen, **no_admin), 1, "error unauthorized: ")
    out_of_scope = run("--api-key", secret, "generate", "other:b", "Hi")  # the key, not the admin token
    _fails(out_of_scope, 1, "error forbidden: ")
    assert out_of_scope.stdout == ""
    _fails(run("--api-key", secret, "generate", "other:b", "Hi", "--stream"), 1, "error forbidden: ")
