"""The embedded default model: a small byte-level Llama-shaped model that writes English and
copies values from its input, needs no download.

Its weights are committed next to this file (`demo_weights/`, bfloat16, 1.7 MB): 4 layers,
4 heads of 32, 0.85M parameters, pretrained on one CPU core on a generated corpus of restaurant
descriptions, greetings, weather reports and short stories plus copy-teaching records of other
domains (`python -m trainer.pretrain_demo --family llama`, docs/training.md). Its chat template
(`demo_weights/chat_template.jinja`) renders a conversation as running text, the only format
the model knows, so `/v1/chat/completions` works out of the box.
"""

import shutil
from pathlib import Path

DEMO_WEIGHTS = Path(__file__).resolve().parent / "demo_weights"


def _same_files(path: Path) -> bool:
    """Every shipped file (weights, tokenizer, chat template) is installed, byte for byte."""
    return all(
        (path / f.name).is_file() and (path / f.name).read_bytes() == f.read_bytes()
        for f in DEMO_WEIGHTS.iterdir()
        if f.is_file()
    )


def ensure_demo_model(path: Path) -> Path:
    """Copy the committed demo model to `path` unless the same files are already there.

    A data dir from an older release (e.g. the former randomly initialised demo model, or one
    without the chat template) is replaced, so the default model is always the shipped one; a
    release with other weights leaves its prefixes stored under the old model's fingerprint,
    where they are simply not found for the new one.
    """
    if (path / "config.json").exists() and _same_files(path):
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(DEMO_WEIGHTS, tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)  # a half-copied model dir is never mistaken for a finished one
    return path
