"""Scale-out deployment files: the HAProxy config (checked by HAProxy itself), the compose `scale`
profile and the Kubernetes manifests (checked against Kubernetes 1.37's schemas)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from prefix_cluster import ClusterError
from prefix_cluster.cli import parse_args
from prefix_cluster.haproxy import CONFIG_TEMPLATE, dns_servers, find_haproxy, loopback_servers, render_config
from server.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DNS_CONFIG = ROOT / "docker" / "haproxy" / "haproxy-dns.cfg"
K8S = ROOT / "docker" / "k8s"
KUBERNETES_VERSION = "1.37.0"
DNS_ADDRESS = "${PREFIX_REPLICAS_ADDR-replica:8000}"


def _haproxy_check(config: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    try:
        binary, env = find_haproxy()
    except ClusterError as exc:
        pytest.skip(f"no HAProxy here ({exc})")
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    return subprocess.run(
        [binary, "-c", "-f", str(path)], env={**os.environ, **env}, capture_output=True, text=True
    )


@pytest.mark.parametrize("balance", ["hash", "roundrobin"])
def test_haproxy_accepts_the_loopback_config(balance: str, tmp_path: Path) -> None:
    config = render_config(loopback_servers([18001, 18002, 18003]), balance)
    result = _haproxy_check(config, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert config.count("server r3 127.0.0.1:18003") == 2  # both backends
    assert ("balance hash var(txn.task_id)" in config) == (balance == "hash")


def test_haproxy_accepts_the_dns_config_and_it_is_current(tmp_path: Path) -> None:
    options = parse_args(["--render-dns", DNS_ADDRESS, "--dns-slots", "10"])
    assert options == (DNS_ADDRESS, 10)
    expected = render_config(dns_servers(DNS_ADDRESS, 10))
    assert DNS_CONFIG.read_text().split("\n", 1)[1] == expected, "regenerate haproxy-dns.cfg (its first line)"
    result = _haproxy_check(DNS_CONFIG.read_text(), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_haproxy_retries_only_what_never_reached_a_replica_or_did_no_work() -> None:
    lines = [line.split("#")[0].strip() for line in CONFIG_TEMPLATE.read_text().splitlines()]
    assert "retry-on conn-failure" in lines  # not empty-response / response-timeout / other 5xx
    # generations also on 503, which the replicas answer only before any work (server/api/retry_safe.py)
    by_task = lines[lines.index("backend by_task") : lines.index("backend any")]
    assert "retry-on conn-failure 503" in by_task
    assert [line for line in lines if line.startswith("retry-on")] == ["retry-on conn-failure"] + [
        "retry-on conn-failure 503"
    ]
    assert "option redispatch 1" in lines and "option http-buffer-request" in lines
    assert "option httpchk GET /ready" in lines
    assert 'hash-balance-factor "${PREFIX_HASH_BALANCE_FACTOR-125}"' in lines
    timeouts = {line.split()[1]: line.split()[2] for line in lines if line.startswith("timeout ")}
    request_timeout = Settings.model_fields["request_timeout"].default
    assert int(timeouts["server"].removesuffix("s")) > request_timeout  # a long generation is not cut
    assert not any(line.startswith("compression") for line in lines)  # would buffer SSE


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_scale_profile() -> None:
    services = _compose()["services"]
    replica, haproxy = services["replica"], services["haproxy"]
    assert replica["profiles"] == ["scale"] and haproxy["profiles"] == ["scale"]
    assert "./docker/haproxy/haproxy-dns.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in haproxy["volumes"]
    assert haproxy["environment"]["PREFIX_REPLICAS_ADDR"] == "replica:8000"
    assert "ports" not in replica  # replicas are reached through HAProxy only
    accepted = {name.upper() for name in Settings.model_fields} | {"REDIS_URL", "PREFIX_ADMIN_TOKEN"}
    unknown = [k for k in replica["environment"] if k.removeprefix("PREFIX_SERVE_") not in accepted]
    assert unknown == []
    drain_s = float(replica["environment"]["PREFIX_SERVE_DRAIN_SECONDS"])
    assert float(replica["stop_grace_period"].removesuffix("s")) >= drain_s + 10
    prometheus = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    names = [
        n for job in prometheus["scrape_configs"] for sd in job.get("dns_sd_configs", []) for n in sd["names"]
    ]
    assert "replica" in names


def _k8s_documents() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_kubernetes_manifests_validate() -> None:
    documents = _k8s_documents()
    kinds = sorted(doc["kind"] for doc in documents)
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "Secret", "Service", "Service"]
    for doc in documents:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises on a bad field


def test_kubernetes_server_drains_before_it_is_killed() -> None:
    by_name = {(doc["kind"], doc["metadata"]["name"]): doc for doc in _k8s_documents()}
    pod = by_name["Deployment", "prefix-server"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert (
        pod["spec"]["terminationGracePeriodSeconds"] > float(env["PREFIX_SERVE_DRAIN_SECONDS"]) + pre_stop_s
    )
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert all(
        name.removeprefix("PREFIX_SERVE_").lower() in Settings.model_fields for name in env if "SERVE" in name
    )
    headless = by_name["Service", "prefix-server-replicas"]["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["selector"] == by_name["Deployment", "prefix-server"]["spec"]["selector"]["matchLabels"]
    config = by_name["ConfigMap", "haproxy-config"]["data"]["haproxy.cfg"]
    assert config == DNS_CONFIG.read_text()
    haproxy_env = {
        e["name"]: e.get("value")
        for e in by_name["Deployment", "prefix-haproxy"]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert haproxy_env["PREFIX_REPLICAS_ADDR"].startswith("prefix-server-replicas.")


def test_envoy_alternative_config_has_bounded_load_hashing_and_health_checks() -> None:
    """docker/envoy/envoy.yaml (untested with Envoy here): parses, ring hash with bounded loads on
    X-Task-Id (set from the JSON body by its Lua filter), /ready checks, connect-failure retries."""
    config = yaml.safe_load((ROOT / "docker" / "envoy" / "envoy.yaml").read_text())
    (cluster,) = config["static_resources"]["clusters"]
    assert cluster["lb_policy"] == "RING_HASH"
    assert cluster["common_lb_config"]["consistent_hashing_lb_config"]["hash_balance_factor"] == 125
    (check,) = cluster["health_checks"]
    assert check["http_health_check"]["path"] == "/ready" and check["unhealthy_threshold"] <= 3
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    hashed = [route for route in routes if "hash_policy" in route["route"]]
    assert {route["match"].get("path") or route["match"]["prefix"] for route in hashed} == {
        "/generate",
        "/v1/completions",
        "/v1/chat/completions",
    }
    request_timeout = Settings.model_fields["request_timeout"].default
    for route in routes:
        assert route["route"]["retry_policy"]["retry_on"] == "connect-failure"
        assert float(route["route"]["timeout"].removesuffix("s")) > request_timeout
    for route in hashed:
        assert route["route"]["hash_policy"] == [{"header": {"header_name": "x-task-id"}}]
    lua, router = manager["http_filters"]
    assert lua["name"] == "envoy.filters.http.lua" and router["name"] == "envoy.filters.http.router"
    assert "x-task-id" in lua["typed_config"]["default_source_code"]["inline_string"]
