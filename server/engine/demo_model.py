"""The embedded default model: a small byte-level GPT-2 that writes English, needs no download.

Its weights are committed next to this file (`demo_weights/`, bfloat16, ~2 MB): 4 layers,
4 heads of 32, ~1M parameters, pretrained on 2 CPU cores on a generated corpus of restaurant
descriptions, greetings, weather reports and short stories (`python -m trainer.pretrain_demo`,
docs/training.md).
"""

import shutil
from pathlib import Path

DEMO_WEIGHTS = Path(__file__).resolve().parent / "demo_weights"
_WEIGHTS_FILE = "model.safetensors"


def _same_weights(path: Path) -> bool:
    installed = path / _WEIGHTS_FILE
    shipped = DEMO_WEIGHTS / _WEIGHTS_FILE
    return installed.exists() and installed.read_bytes() == shipped.read_bytes()


def ensure_demo_model(path: Path) -> Path:
    """Copy the committed demo model to `path` unless the same weights are already there.

    A data dir from an older release (e.g. the former randomly initialised demo model) is
    replaced, so the default model is always the shipped one; its prefixes stay stored under
    the old model's fingerprint and are simply not found for the new one.
    """
    if (path / "config.json").exists() and _same_weights(path):
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(DEMO_WEIGHTS, tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)  # a half-copied model dir is never mistaken for a finished one
    return path
