"""The suite, the bench and the server stay honest on CPUs without native bf16 (AVX2-only), where a
bf16 matmul runs tens of times slower than fp32: every low-precision compute path goes through
`server.engine.precision`, the one place that measures this CPU."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from server.engine.model_loader import ModelOptions, load_model
from server.engine.precision import NATIVE_MAX_SLOWDOWN, cpu_precision, machine_info, needs_fallback
from tests.tiny_models import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
LOW_PRECISION = re.compile(r"bfloat16|float16|\bbf16\b|\.half\(\)")
HELPER = "server.engine.precision"

# Modules that name a low-precision dtype without computing in it on the CPU, and why.
NO_COMPUTE = {
    "tests/test_portable_precision.py": "this guard",
    "tests/test_config.py": "parses the --dtype flag",
    "tests/prefix_store/test_format.py": "casts and serialises prefix tensors",
    "tests/prefix_store/test_fingerprint.py": "casts weights to compare fingerprints (no forward)",
    "tests/prefix_store/test_redis_store.py": "a dtype name stored with a prefix",
    "tests/test_bench_smoke.py": "runs bench scripts, which are checked here themselves",
    "bench/store_bench.py": "stores prefix bytes of either dtype (no matmul)",
    "bench/throughput_report.py": "text of the report",
    "bench/throughput_modes.py": "runs only under throughput.py, gpu_check.py and compile_trial.py",
    "trainer/pretrain_demo.py": "trains in float32, saves the weights as bfloat16",
}


def _python_files() -> list[Path]:
    folders = ["tests", "bench", "trainer", "examples", "clients", "docker"]
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_low_precision_compute_goes_through_the_capability_check() -> None:
    """A module that runs a model or the bench in bf16/fp16 without asking the helper could make
    the suite 80x slower on the next CPU CI lands on (it did: gpu_check's smoke timed out)."""
    offenders = []
    for path in _python_files():
        name = str(path.relative_to(ROOT))
        text = path.read_text()
        if LOW_PRECISION.search(text) and name not in NO_COMPUTE and HELPER not in text:
            offenders.append(name)
    assert not offenders, f"bf16/fp16 compute without {HELPER} (or add to NO_COMPUTE, with why): {offenders}"
    stale = [name for name in NO_COMPUTE if not (ROOT / name).exists()]
    assert not stale, f"NO_COMPUTE names files that are gone: {stale}"


def test_float32_is_native_and_the_measurement_is_kept() -> None:
    assert cpu_precision(torch.float32).slowdown == 1.0 and cpu_precision(torch.float32).is_native
    bf16 = cpu_precision(torch.bfloat16)
    assert bf16 is cpu_precision(torch.bfloat16)  # measured once per process
    assert bf16.slowdown > 0 and bf16.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert bf16.is_native == (bf16.slowdown <= NATIVE_MAX_SLOWDOWN)
    assert needs_fallback(torch.float32, "cpu") is None and needs_fallback(torch.bfloat16, "cuda") is None
    assert (needs_fallback(torch.bfloat16, "cpu") is None) == bf16.is_native
    info = machine_info()
    assert info["cpu_capability"] == bf16.cpu_capability and info["native_bf16"] == bf16.is_native
    print(f"this CPU: {bf16.reason()}")


@pytest.mark.parametrize("dtype", ["bfloat16", "auto"])
def test_server_warns_once_about_emulated_low_precision(
    dtype: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`--dtype bfloat16` on a CPU without native bf16 still loads, with one warning saying how much
    slower and what to pass instead; `auto` stays float32 on CPU and says nothing."""
    path = save_tiny_model("gpt2", tmp_path / "model")
    with caplog.at_level(logging.WARNING, logger="server.engine.model_loader"):
        loaded = load_model(ModelOptions(str(path), "cpu", dtype, tmp_path))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if dtype == "auto":
        assert loaded.dtype == torch.float32 and not warnings
        return
    assert loaded.dtype == torch.bfloat16
    slow = needs_fallback(torch.bfloat16, "cpu")
    if slow is None:
        assert not warnings
    else:
        assert len(warnings) == 1, warnings
        assert f"{slow.slowdown:.1f}x" in warnings[0] and "--dtype float32" in warnings[0]
