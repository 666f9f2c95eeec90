"""The HTTP layer's shape: no torch behind it, and an OpenAPI schema that names what is sent."""

import json
import subprocess
import sys
from pathlib import Path

from fastapi.openapi.utils import get_openapi

ROOT = Path(__file__).resolve().parents[2]


def test_the_http_layer_imports_no_torch() -> None:
    """Every module of server/api, and the client, import without torch (tensors stay behind
    the engine and the store; records crossing into the API are torch-free)."""
    script = (
        "import importlib, pkgutil, sys, server.api, clients\n"
        "for m in pkgutil.iter_modules(server.api.__path__):\n"
        "    importlib.import_module('server.api.' + m.name)\n"
        "importlib.import_module('clients.cli')\n"
        "print(json.dumps(sorted(n for n in sys.modules if n.split('.')[0] == 'torch')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", "import json\n" + script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == []


def _openapi() -> dict:
    from fastapi import FastAPI

    from server.api import (
        routes_admin,
        routes_chat,
        routes_drain,
        routes_generate,
        routes_health,
        routes_keys,
        routes_openai,
    )

    app = FastAPI()
    modules = (
        routes_admin,
        routes_chat,
        routes_drain,
        routes_generate,
        routes_health,
        routes_keys,
        routes_openai,
    )
    for module in modules:
        app.include_router(module.router)
    return get_openapi(title="t", version="0", routes=app.routes)


def test_every_answer_has_a_typed_schema() -> None:
    """Each route's 200/201 names a component schema (no untyped `object` answers)."""
    untyped = []
    for path, methods in _openapi()["paths"].items():
        for method, op in methods.items():
            ok = {s: r for s, r in op["responses"].items() if s in ("200", "201")}
            for status, response in ok.items():
                schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                if path == "/metrics":
                    continue  # Prometheus text
                if "$ref" not in schema:
                    untyped.append(f"{method.upper()} {path} {status}: {schema}")
    assert untyped == []


def test_one_prefix_metadata_schema() -> None:
    """Upload, get, list and warm answer the same `PrefixMeta` record (warm adds `tiers`)."""
    schemas = _openapi()["components"]["schemas"]
    meta = set(schemas["PrefixMeta"]["properties"])
    assert set(schemas["WarmedPrefix"]["properties"]) == meta | {"tiers"}
    assert schemas["PrefixList"]["properties"]["items"]["items"] == {
        "$ref": "#/components/schemas/PrefixMeta"
    }
    from dataclasses import fields

    from clients.models import PrefixInfo
    from prefix_store.meta import PrefixMeta

    assert issubclass(PrefixInfo, PrefixMeta)
    assert {f.name for f in fields(PrefixInfo)} == meta | {"tiers"}


def test_the_clients_drain_state_is_the_servers() -> None:
    from dataclasses import fields

    from clients.models import DrainState

    schema = _openapi()["components"]["schemas"]["DrainState"]
    assert {f.name for f in fields(DrainState)} == set(schema["properties"])


def test_one_api_key_record() -> None:
    """The key store, `/admin/keys` and the client share one `ApiKey` record (as `PrefixMeta`)."""
    from dataclasses import fields

    from clients.models import CreatedKey, KeyInfo
    from prefix_store.meta import ApiKey
    from prefix_store.meta import CreatedKey as ServerCreatedKey

    assert KeyInfo is ApiKey and CreatedKey is ServerCreatedKey
    schemas = _openapi()["components"]["schemas"]
    names = {f.name for f in fields(ApiKey)}
    assert set(schemas["ApiKey"]["properties"]) == names
    assert set(schemas["CreatedKey"]["properties"]) == names | {"key"}
    assert schemas["KeyList"]["properties"]["items"]["items"] == {"$ref": "#/components/schemas/ApiKey"}


def test_the_client_imports_neither_fastapi_nor_torch() -> None:
    script = (
        "import json, sys, clients, clients.cli\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules} & {'torch', 'fastapi'})))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
