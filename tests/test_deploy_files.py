"""Static checks of the deployment files: they parse and agree with the code they deploy.

No Docker, no network: YAML/JSON/TOML parsing plus imports of the server's own Settings and Metrics.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
import torch
import yaml
from pydantic import AliasChoices

from prefix_store.entry import PrefixSpec
from prefix_store.prefix_cache import PrefixCache
from prefix_store.redis_store import RedisPrefixStore
from server.config import Settings
from server.engine.stats import EngineStats
from server.metrics import Metrics
from tests.prometheus_process import find_binary

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS = ROOT / "docker" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "prefix-server.json"
GRAFANA_DATASOURCES = ROOT / "docker" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDERS = ROOT / "docker" / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
NGINX = ROOT / "docker" / "nginx" / "nginx.conf"

METRIC_NAME = re.compile(r"prefix_server_[a-z_]+")
# `${VAR}`, `${VAR:-default}`, `${VAR-default}`: compose interpolation, resolved to its default;
# `${VAR:?message}` (required, no default) to the operator's value in REQUIRED.
INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?:(?::?-(?P<default>[^}]*))|(?::?\?(?P<message>[^}]*)))?\}")
REQUIRED = {
    "PREFIX_ADMIN_TOKEN": "an-operators-admin-token",
    "GRAFANA_ADMIN_PASSWORD": "an-operators-password",
    "PREFIX_METRICS_TOKEN": "an-operators-metrics-token",
}
SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def _load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = _load_yaml(COMPOSE)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def _env_mapping(environment: dict[str, Any] | list[str] | None) -> dict[str, str]:
    """Compose `environment` in either form (mapping or `KEY=VALUE` list), interpolation resolved."""
    if environment is None:
        return {}
    if isinstance(environment, list):
        environment = {key: value for key, _, value in (item.partition("=") for item in environment)}

    def resolve(value: Any) -> str:
        return INTERPOLATION.sub(
            lambda m: REQUIRED[m.group("name")] if m.group("message") else m.group("default") or "",
            "" if value is None else str(value),
        )

    return {str(key): resolve(value) for key, value in environment.items()}


def _accepted_env_names() -> set[str]:
    """Env names Settings reads: `PREFIX_SERVE_<FIELD>`, or a field's explicit alias choices.

    A choice equal to the field's own name is there for keyword construction (`populate_by_name`),
    not meant as an env name, so it does not count.
    """
    prefix = str(Settings.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            choices = [choice for choice in alias.choices if isinstance(choice, str) and choice != name]
            names |= {choice.upper() for choice in choices}
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add((prefix + name).upper())
    return names


def _bind_sources(service: dict[str, Any]) -> list[str]:
    """Host paths of a service's bind mounts (short `./src:/dst[:ro]` or long `type: bind`)."""
    sources = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                sources.append(str(volume["source"]))
        else:
            source = str(volume).split(":", 1)[0]
            if source.startswith((".", "/", "~")):
                sources.append(source)
    return sources


def _bind_target(service: dict[str, Any], source: str) -> str:
    for volume in service.get("volumes", []):
        if isinstance(volume, str) and volume.split(":")[0].rstrip("/") == source.rstrip("/"):
            return volume.split(":")[1]
    raise AssertionError(f"{source} is not bind-mounted")


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in _dockerfile_instructions():
        if keyword == "ENV":
            for token in shlex.split(args):
                key, sep, value = token.partition("=")
                assert sep, f"use ENV KEY=VALUE form, got {token!r}"
                env[key] = value
    return env


def _exported_metric_names() -> set[str]:
    """Every sample name `/metrics` can expose, including the live collector's."""
    metrics = Metrics()
    spec = PrefixSpec(1, 1, 1, torch.float32, 1)
    store = RedisPrefixStore(redis.asyncio.Redis(), "fp")  # never connects: only its counters are read
    metrics.bind(lambda: EngineStats(0, 0, 1, 1, True), PrefixCache(store, spec, torch.device("cpu"), 0))
    names: set[str] = set()
    for family in metrics.registry.collect():
        names |= {family.name + suffix for suffix in SAMPLE_SUFFIXES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples if not sample.name.endswith("_created")}
    return names


def _dashboard_exprs(node: Any) -> list[str]:
    """Every `expr` string anywhere in the dashboard (panels, rows, nested panels)."""
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        for value in node.values():
            found += _dashboard_exprs(value)
        return found
    if isinstance(node, list):
        return [expr for item in node for expr in _dashboard_exprs(item)]
    return []


# --- compose ---------------------------------------------------------------------------------


def test_compose_has_the_stack(compose: dict[str, Any]) -> None:
    assert {"redis", "server", "prometheus", "grafana"} <= set(compose["services"])


def test_compose_bind_mounts_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for source in _bind_sources(service):
            assert (ROOT / source).exists(), f"service {name} mounts missing {source}"


def test_compose_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            if isinstance(volume, str) and not volume.startswith((".", "/", "~")):
                assert volume.split(":", 1)[0] in declared, f"service {name}: undeclared volume {volume}"


def test_compose_builds_this_repo(compose: dict[str, Any]) -> None:
    build = compose["services"]["server"]["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (ROOT / context / dockerfile).resolve() == DOCKERFILE


def test_server_env_names_are_real_settings(compose: dict[str, Any]) -> None:
    accepted = _accepted_env_names()
    assert {"REDIS_URL", "PREFIX_ADMIN_TOKEN", "PREFIX_SERVE_HOST", "PREFIX_SERVE_DATA_DIR"} <= accepted
    env = _env_mapping(compose["services"]["server"].get("environment"))
    assert {"REDIS_URL", "PREFIX_ADMIN_TOKEN"} <= set(env)
    unknown = {key for key in env if key.upper() not in accepted}
    assert not unknown, f"server env names that Settings ignores: {sorted(unknown)}"
    assert env["REDIS_URL"].startswith("redis://redis:")


def test_server_env_values_validate(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    accepted = _accepted_env_names()
    env = {**_dockerfile_env(), **_env_mapping(compose["services"]["server"].get("environment"))}
    for key in accepted:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        if key.upper() in accepted:
            monkeypatch.setenv(key, value)
    settings = Settings.model_validate({})
    assert settings.host == "0.0.0.0"
    assert settings.data_dir == Path("/data")
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.admin_token == REQUIRED["PREFIX_ADMIN_TOKEN"]


def test_server_depends_on_healthy_redis(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert "healthcheck" in redis
    assert compose["services"]["server"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "--appendonly" in redis["command"] and any(v.endswith(":/data") for v in redis["volumes"])


def test_compose_services_have_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("redis", "server", "prometheus", "grafana"):
        assert "test" in services[name]["healthcheck"], name
    assert "/ready" in " ".join(services["server"]["healthcheck"]["test"])
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert any(v.endswith(":/models:ro") for v in services["server"]["volumes"])  # model dir as a volume
    assert services["server"]["environment"]["PREFIX_ADMIN_TOKEN"].startswith("${PREFIX_ADMIN_TOKEN")


def test_promtool_accepts_the_prometheus_config(tmp_path: Path) -> None:
    """As compose runs it: the config next to the token file Prometheus writes when it starts."""
    promtool = find_binary("promtool")
    if promtool is None:
        pytest.skip("no promtool: `make prometheus` could not `apt-get download prometheus` here")
    shutil.copy(PROMETHEUS, tmp_path / "prometheus.yml")
    (tmp_path / "metrics_token").write_text(REQUIRED["PREFIX_METRICS_TOKEN"])
    command = [promtool, "check", "config", str(tmp_path / "prometheus.yml")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_cmd_is_the_console_script(pyproject: dict[str, Any]) -> None:
    cmds = [args for keyword, args in _dockerfile_instructions() if keyword == "CMD"]
    assert len(cmds) == 1
    cmd = json.loads(cmds[0])
    assert cmd[0] in pyproject["project"]["scripts"]


def test_dockerfile_pins_torch_like_pyproject(pyproject: dict[str, Any]) -> None:
    pins = [dep for dep in pyproject["project"]["dependencies"] if re.match(r"torch\s*==", dep)]
    assert len(pins) == 1
    version = pins[0].split("==", 1)[1].strip()
    text = DOCKERFILE.read_text()
    assert set(re.findall(r"torch==([\w.+-]+)", text)) == {version}
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text  # CPU by default
    assert "--index-url ${TORCH_INDEX} torch==" in text


def test_dockerfile_runtime_contract() -> None:
    instructions = _dockerfile_instructions()
    assert instructions[0] == ("ARG", "BASE=python:3.11-slim")
    froms = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert len(froms) == 2 and instructions[froms[1]][1] == "${BASE} AS runtime"  # multi-stage
    runtime = instructions[froms[1] :]
    keywords = [keyword for keyword, _ in runtime]
    args = {keyword: value for keyword, value in runtime}
    assert args["USER"] not in {"root", "0"}  # no root runtime user
    assert keywords.index("USER") < keywords.index("CMD")
    assert "/data" in args["VOLUME"]
    assert args["EXPOSE"] == str(Settings.model_fields["port"].default)
    assert "/ready" in args["HEALTHCHECK"] and "curl" not in args["HEALTHCHECK"]
    env = _dockerfile_env()
    assert env["PREFIX_SERVE_HOST"] == "0.0.0.0" and env["PREFIX_SERVE_DATA_DIR"] == "/data"
    accepted = _accepted_env_names()
    assert all(key in accepted for key in env if key.startswith("PREFIX_"))


def test_dockerfile_copies_every_package(pyproject: dict[str, Any]) -> None:
    copied = {
        value.split()[0].rstrip("/") for keyword, value in _dockerfile_instructions() if keyword == "COPY"
    }
    assert "pyproject.toml" in copied
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", "data", ".git", ".pytest_cache"} <= ignored


# --- Prometheus ------------------------------------------------------------------------------


def test_prometheus_scrapes_the_server(compose: dict[str, Any]) -> None:
    config = _load_yaml(PROMETHEUS)
    jobs = config["scrape_configs"]
    targets = [
        (job, target)
        for job in jobs
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    assert [target for _, target in targets] == ["server:8000"]
    job = targets[0][0]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scrape_interval", config.get("global", {}).get("scrape_interval")) == "5s"
    prometheus = compose["services"]["prometheus"]
    assert _bind_target(prometheus, "./docker/prometheus/prometheus.yml") == "/etc/prometheus/prometheus.yml"


# --- Grafana ---------------------------------------------------------------------------------


def test_dashboard_metrics_are_exported() -> None:
    exprs = _dashboard_exprs(json.loads(DASHBOARD.read_text()))
    assert exprs
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    exported = _exported_metric_names()
    assert not used - exported, f"dashboard uses metrics the server never exports: {sorted(used - exported)}"
    wanted = {
        "prefix_server_requests_total",
        "prefix_server_request_duration_seconds_bucket",
        "prefix_server_time_to_first_token_seconds_bucket",
        "prefix_server_batch_size_bucket",
        "prefix_server_generated_tokens_total",
        "prefix_server_running_requests",
        "prefix_server_waiting_requests",
        "prefix_server_prefix_cache_hits_total",
        "prefix_server_prefix_cache_misses_total",
        "prefix_server_prefix_cache_resident_bytes",
    }
    assert wanted <= used, f"dashboard lacks panels for {sorted(wanted - used)}"


def test_dashboard_uses_the_provisioned_datasource() -> None:
    sources = _load_yaml(GRAFANA_DATASOURCES)["datasources"]
    uids = {source["uid"] for source in sources}
    assert any(source["url"] == "http://prometheus:9090" for source in sources)
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] in uids, panel["title"]


def test_grafana_provisions_the_mounted_dashboards(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    assert _bind_target(grafana, "./docker/grafana/provisioning") == "/etc/grafana/provisioning"
    mounted = _bind_target(grafana, "./docker/grafana/dashboards")
    paths = {provider["options"]["path"] for provider in _load_yaml(GRAFANA_PROVIDERS)["providers"]}
    assert paths == {mounted}


# --- nginx -----------------------------------------------------------------------------------


def test_nginx_proxies_streams_and_uploads() -> None:
    text = re.sub(r"#.*", "", NGINX.read_text())
    assert text.count("{") == text.count("}")
    assert re.search(r"\bserver\s+server:8000\b", text)
    assert re.search(r"client_max_body_size\s+512m;", text)
    generate = re.search(r"location\s+[^{]*generate[^{]*\{(?P<body>[^}]*)\}", text)
    assert generate and re.search(r"proxy_buffering\s+off;", generate.group("body"))


def test_docs_describe_every_exported_metric() -> None:
    docs = (ROOT / "docs" / "metrics.md").read_text()
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in _exported_metric_names()}
    undocumented = sorted(name for name in families if name.removesuffix("_info") not in docs)
    assert "prefix_server_time_per_output_token_seconds" in families
    assert undocumented == []


def test_stop_grace_period_outlasts_the_drain(compose: dict[str, Any]) -> None:
    """Docker SIGKILLs after stop_grace_period (default 10 s): the drain must fit inside it."""
    server = compose["services"]["server"]
    drain_s = float(server["environment"]["PREFIX_SERVE_DRAIN_SECONDS"])
    grace = str(server["stop_grace_period"])
    assert grace.endswith("s") and float(grace[:-1]) >= drain_s + 10


# --- compose as a compose tool reads it (podman-compose from PyPI; --dry-run: no podman needed) ---


def _compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`podman-compose config` with every profile, in an environment holding only `env`.
    `--dry-run` skips podman-compose's `podman --version` probe: no podman binary is needed."""
    command = [
        str(Path(sys.executable).parent / "podman-compose"),
        "--dry-run",
        "--profile", "proxy",
        "--profile", "scale",
        "-f", str(COMPOSE),
        "config",
    ]  # fmt: skip
    base = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(command, env={**base, **env}, capture_output=True, text=True, timeout=60, cwd=ROOT)


def _published(config: dict[str, Any]) -> dict[str, list[str]]:
    return {name: [str(p) for p in svc.get("ports", [])] for name, svc in config["services"].items()}


def test_compose_config_binds_loopback_and_takes_the_operators_secrets() -> None:
    done = _compose_config(REQUIRED)
    assert done.returncode == 0, done.stderr[-2000:]
    config = yaml.safe_load(done.stdout)
    published = _published(config)
    assert {"server", "prometheus", "grafana", "nginx", "haproxy"} <= {n for n, p in published.items() if p}
    assert all(port.startswith("127.0.0.1:") for ports in published.values() for port in ports), published
    services = config["services"]
    for name in ("server", "replica"):
        assert services[name]["environment"]["PREFIX_ADMIN_TOKEN"] == REQUIRED["PREFIX_ADMIN_TOKEN"]
    grafana_env = services["grafana"]["environment"]
    assert grafana_env["GF_SECURITY_ADMIN_PASSWORD"] == REQUIRED["GRAFANA_ADMIN_PASSWORD"]


def test_compose_config_publishes_wider_only_when_asked() -> None:
    done = _compose_config({**REQUIRED, "PREFIX_BIND": "0.0.0.0"})
    assert done.returncode == 0, done.stderr[-2000:]
    published = _published(yaml.safe_load(done.stdout))
    assert published["server"] == ["0.0.0.0:8000:8000"] and published["grafana"] == ["0.0.0.0:3000:3000"]


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_compose_config_refuses_a_missing_secret_with_a_clear_message(missing: str) -> None:
    done = _compose_config({k: v for k, v in REQUIRED.items() if k != missing})
    assert done.returncode != 0
    assert f"required variable {missing} is missing a value: set {missing}" in done.stderr


def test_compose_ships_no_default_secret() -> None:
    text = COMPOSE.read_text()
    assert "change-me" not in text
    for secret in ("GRAFANA_ADMIN_PASSWORD", "PREFIX_ADMIN_TOKEN", "PREFIX_METRICS_TOKEN"):
        assert f"{secret}:-" not in text and f"{secret}:?" in text
