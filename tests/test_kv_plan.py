"""Sizing the KV pool: `--kv-cache-bytes`, or on CUDA `--gpu-memory-utilization` of the memory free
after the weights (pure arithmetic, no GPU needed); `--cache-bytes` is deprecated and warned about."""

from __future__ import annotations

import logging

import pytest
import torch

from server.cli import parse_args
from server.kv_plan import pool_budget, pool_bytes

GiB = 1 << 30


def test_pool_bytes_is_the_fraction_of_free_memory_when_the_device_reports_it() -> None:
    assert pool_bytes(GiB, 0.9, 40 * GiB) == int(0.9 * 40 * GiB)
    assert pool_bytes(GiB, 0.5, 3) == 1  # rounded down: never more than the fraction
    assert pool_bytes(GiB, 1.0, 8 * GiB) == 8 * GiB


def test_pool_bytes_falls_back_to_kv_cache_bytes() -> None:
    assert pool_bytes(GiB, None, 40 * GiB) == GiB  # no fraction asked
    assert pool_bytes(GiB, 0.9, None) == GiB  # no free memory figure (a CPU)


def test_the_fraction_is_a_flag_in_0_1() -> None:
    assert parse_args(["--gpu-memory-utilization", "0.85"]).gpu_memory_utilization == 0.85
    assert parse_args([]).gpu_memory_utilization is None
    for bad in ("0", "1.5"):
        with pytest.raises(ValueError):
            parse_args(["--gpu-memory-utilization", bad])


def test_on_cpu_the_fraction_is_ignored_and_cache_bytes_warns(caplog: pytest.LogCaptureFixture) -> None:
    settings = parse_args(
        ["--gpu-memory-utilization", "0.9", "--cache-bytes", "4096", "--kv-cache-bytes", "12345"]
    )
    with caplog.at_level(logging.INFO, logger="server.kv_plan"):
        assert pool_budget(settings, torch.device("cpu")) == (12345, "--kv-cache-bytes")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "--cache-bytes is deprecated and has no effect" in warnings[0]
    assert "KV pool" in warnings[0] and "--kv-cache-bytes" in warnings[0]
    assert any("--gpu-memory-utilization is ignored on cpu" in r.getMessage() for r in caplog.records)


def test_without_cache_bytes_nothing_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="server.kv_plan"):
        assert pool_budget(parse_args([]), torch.device("cpu")) == (GiB, "--kv-cache-bytes")
    assert caplog.records == []
