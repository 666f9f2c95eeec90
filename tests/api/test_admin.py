"""Admin API: auth, uploads good and bad (nothing stored on failure), list, get, delete."""

from __future__ import annotations

import io
import json
import pickle

import httpx
import pytest
import safetensors.torch
import torch

from prefix_store.format import max_abs_value
from tests.server_process import ServerProcess, upload_adapter
from tests.tiny_models import MAX_POSITIONS, Adapter

LAYERS, HEADS, HEAD_DIM = 2, 4, 8  # the tiny GPT-2


def _canonical(prefix_len: int = 3, **metadata: str) -> bytes:
    tensor = torch.randn(LAYERS, 2, HEADS, prefix_len, HEAD_DIM)
    return safetensors.torch.save({"prefix": tensor}, metadata=metadata or None)


def _put(client: httpx.Client, server: ServerProcess, task_id: str, files: dict, headers: dict | None = None):  # type: ignore[no-untyped-def]
    headers = server.admin_headers if headers is None else headers
    return client.put(f"{server.url}/admin/prefixes/{task_id}", files=files, headers=headers)


def _assert_absent(client: httpx.Client, server: ServerProcess, task_id: str) -> None:
    response = client.get(f"{server.url}/admin/prefixes/{task_id}", headers=server.admin_headers)
    assert response.status_code == 404, response.text


def test_auth(server: ServerProcess, client: httpx.Client) -> None:
    files = {"weights": ("p", _canonical(), "application/octet-stream")}
    assert _put(client, server, "t:auth", files, headers={}).status_code == 401
    wrong = _put(client, server, "t:auth", files, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"
    assert client.get(server.url + "/admin/prefixes").status_code == 401
    _assert_absent(client, server, "t:auth")


def test_upload_versions_get_list_delete(server: ServerProcess, client: httpx.Client) -> None:
    files = {"weights": ("p", _canonical(3), "application/octet-stream")}
    first = _put(client, server, "acme:v", files)
    assert first.status_code == 201, first.text
    info = first.json()
    assert (info["prefix_len"], info["dtype"], info["num_bytes"]) == (
        3,
        "float32",
        LAYERS * 2 * HEADS * 3 * HEAD_DIM * 4,
    )
    second = _put(
        client, server, "acme:v", {"weights": ("p", _canonical(5), "application/octet-stream")}
    ).json()
    assert second["version"] == info["version"] + 1 and second["prefix_len"] == 5
    got = client.get(f"{server.url}/admin/prefixes/acme:v", headers=server.admin_headers).json()
    assert got == second
    generated = client.post(
        server.url + "/generate", json={"task_id": "acme:v", "input_ids": [5], "max_new_tokens": 2}
    )
    assert generated.json()["prefix_version"] == second["version"]
    assert generated.json()["usage"]["prefix_tokens"] == 5
    listed = client.get(server.url + "/admin/prefixes?limit=1", headers=server.admin_headers).json()
    assert len(listed["items"]) == 1 and listed["next_cursor"] is not None
    assert (
        client.delete(f"{server.url}/admin/prefixes/acme:v", headers=server.admin_headers).status_code == 204
    )
    _assert_absent(client, server, "acme:v")
    gone = client.post(server.url + "/generate", json={"task_id": "acme:v", "input_ids": [5]})
    assert gone.status_code == 404
    assert (
        client.delete(f"{server.url}/admin/prefixes/acme:v", headers=server.admin_headers).status_code == 404
    )


def _torch_save_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"prefix": torch.randn(LAYERS, 2, HEADS, 3, HEAD_DIM)}, buffer)
    return buffer.getvalue()


class _Boom:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (exec, ("open('/tmp/prefix-server-pwned', 'w').write('x')",))


@pytest.mark.parametrize(
    ("name", "weights", "config", "status", "code"),
    [
        ("garbage", b"\x00\x01not a safetensors file", None, 422, "invalid_prefix"),
        ("empty", b"", None, 422, "invalid_prefix"),
        ("pickle", pickle.dumps(_Boom()), None, 422, "invalid_prefix"),
        ("torch_save", _torch_save_bytes(), None, 422, "invalid_prefix"),
        (
            "wrong_key",
            safetensors.torch.save({"kv": torch.randn(LAYERS, 2, HEADS, 3, HEAD_DIM)}),
            None,
            422,
            "invalid_prefix",
        ),
        (
            "wrong_layers",
            safetensors.torch.save({"prefix": torch.randn(LAYERS + 1, 2, HEADS, 3, HEAD_DIM)}),
            None,
            422,
            "model_mismatch",
        ),
        (
            "wrong_head_dim",
            safetensors.torch.save({"prefix": torch.randn(LAYERS, 2, HEADS, 3, HEAD_DIM * 2)}),
            None,
            422,
            "model_mismatch",
        ),
        (
            "nan",
            safetensors.torch.save({"prefix": torch.full((LAYERS, 2, HEADS, 3, HEAD_DIM), float("nan"))}),
            None,
            422,
            "invalid_prefix",
        ),
        (
            "inf",
            safetensors.torch.save({"prefix": torch.full((LAYERS, 2, HEADS, 3, HEAD_DIM), float("inf"))}),
            None,
            422,
            "invalid_prefix",
        ),
        (
            "int",
            safetensors.torch.save({"prefix": torch.ones(LAYERS, 2, HEADS, 3, HEAD_DIM, dtype=torch.int32)}),
            None,
            422,
            "invalid_prefix",
        ),
        (
            "too_long",
            safetensors.torch.save({"prefix": torch.randn(LAYERS, 2, HEADS, 400, HEAD_DIM)}),
            None,
            422,
            "invalid_prefix",
        ),
        (
            "other_model",
            _canonical(model_fingerprint="llama-L2-H4-KV2-D8-0000000000000000"),
            None,
            422,
            "model_mismatch",
        ),
        ("too_large", b"\x00" * (3 * 1024 * 1024), None, 413, "too_large"),
        ("bad_config", None, b"{not json", 422, "invalid_prefix"),
        ("lora_config", None, json.dumps({"peft_type": "LORA"}).encode(), 422, "invalid_prefix"),
    ],
)
def test_bad_upload_stores_nothing(
    server: ServerProcess, client: httpx.Client, adapter: Adapter, name: str, weights: bytes | None,
    config: bytes | None, status: int, code: str,
) -> None:  # fmt: skip
    task_id = f"bad:{name}"
    files = {"weights": ("w", adapter.weights if weights is None else weights, "application/octet-stream")}
    if config is not None:
        files["config"] = ("c", config, "application/json")
    response = _put(client, server, task_id, files)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    _assert_absent(client, server, task_id)


def test_peft_config_disagreeing_with_tensor(
    server: ServerProcess, client: httpx.Client, adapter: Adapter
) -> None:
    config = json.loads(adapter.config)
    config["num_virtual_tokens"] += 1
    response = upload_adapter(client, server, "bad:peft", adapter.weights, json.dumps(config).encode())
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_prefix"
    assert "num_virtual_tokens" in response.json()["error"]["message"]
    _assert_absent(client, server, "bad:peft")


def test_malformed_multipart(server: ServerProcess, client: httpx.Client) -> None:
    url = f"{server.url}/admin/prefixes/bad:form"
    no_form = client.put(
        url,
        content=b"raw bytes",
        headers={**server.admin_headers, "content-type": "application/octet-stream"},
    )
    assert no_form.status_code == 422
    missing = _put(client, server, "bad:form", {"config": ("c", b"{}", "application/json")})
    assert missing.status_code == 422 and "weights" in missing.json()["error"]["message"]
    extra = _put(client, server, "bad:form", {"weights": ("w", _canonical(), "x"), "junk": ("j", b"1", "x")})
    assert extra.status_code == 422 and "junk" in extra.json()["error"]["message"]
    bad_id = client.put(
        f"{server.url}/admin/prefixes/bad id",
        files={"weights": ("w", _canonical(), "x")},
        headers=server.admin_headers,
    )
    assert bad_id.status_code == 422
    _assert_absent(client, server, "bad:form")


def _upload_values(client: httpx.Client, server: ServerProcess, task_id: str, magnitude: float):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    signs = torch.randn(LAYERS, 2, HEADS, 3, HEAD_DIM).sign()
    weights = safetensors.torch.save({"prefix": signs * magnitude})
    return _put(client, server, task_id, {"weights": ("p", weights, "application/octet-stream")})


def test_values_just_below_the_attention_bound_serve_and_above_it_are_refused(
    server: ServerProcess, client: httpx.Client
) -> None:
    """The bound of float32 with head_dim 8 is sqrt(3.4e38 / 8) = 6.5e18 (see format.max_abs_value);
    3e38 (finite) was accepted and then failed every generation on it."""
    bound = max_abs_value(torch.float32, HEAD_DIM)
    assert _upload_values(client, server, "big:below", 0.99 * bound).status_code == 201
    served = client.post(
        server.url + "/generate", json={"task_id": "big:below", "input_ids": [5, 6], "max_new_tokens": 3}
    )
    assert served.status_code == 200 and served.json()["finish_reason"] in ("length", "eos"), served.text
    for name, magnitude in (("above", 1.01 * bound), ("huge", 3e38)):
        refused = _upload_values(client, server, f"big:{name}", magnitude)
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_prefix"
        assert "beyond it attention scores overflow" in refused.json()["error"]["message"]
        _assert_absent(client, server, f"big:{name}")


def test_a_prefix_must_leave_room_for_a_prompt_token_and_one_more(
    server: ServerProcess, client: httpx.Client
) -> None:
    """256 positions: a prefix of 254 serves a one-token prompt and one new token; 255 is refused."""
    fits = _put(client, server, "room:fits", {"weights": ("p", _canonical(MAX_POSITIONS - 2), "x")})
    assert fits.status_code == 201, fits.text
    body = {"task_id": "room:fits", "input_ids": [5], "max_new_tokens": 1}
    assert client.post(server.url + "/generate", json=body).status_code == 200
    no_room = _put(client, server, "room:none", {"weights": ("p", _canonical(MAX_POSITIONS - 1), "x")})
    assert no_room.status_code == 422 and no_room.json()["error"]["code"] == "invalid_prefix"
    assert f"expected 1..{MAX_POSITIONS - 2}" in no_room.json()["error"]["message"]
    _assert_absent(client, server, "room:none")


def test_text_prefixes_not_utf8_or_too_long_to_fit_are_refused(
    server: ServerProcess, client: httpx.Client
) -> None:
    """Invalid UTF-8 is 422 invalid_request in a plain field (once read as Latin-1) as in a file
    part; a text with more characters than the context's tokens can hold is refused untokenized."""
    for part in ((None, b"ok \xff\xfe"), ("t.txt", b"ok \xff\xfe")):
        response = _put(client, server, "text:bad", {"text": part})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_request" and "not valid UTF-8" in error["message"]
    fine = _put(client, server, "text:good", {"text": (None, "héllo wörld".encode())})
    assert fine.status_code == 201 and fine.json()["prefix_len"] == len("héllo wörld".encode())
    huge = _put(client, server, "text:bad", {"text": (None, b"x" * 300_000)})
    assert huge.status_code == 422 and "characters" in huge.json()["error"]["message"]
    _assert_absent(client, server, "text:bad")
