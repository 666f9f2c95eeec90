"""Checkpoints as people have them, through the server's own loader (`load_model`): tokenizer files
of each family, sharded weights, code shipped with the model, hub ids offline."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from prefix_store.fingerprint import model_fingerprint
from server.engine.model_loader import LoadedModel, ModelOptions, load_model
from server.engine.model_source import ModelSourceError, locate_model
from tests.tiny_families import (
    FAMILIES,
    REMOTE_CODE_FILE,
    corpus,
    save_family_model,
    save_remote_code_model,
    tiktoken_encoding,
)


def _load(model_dir: Path, trust_remote_code: bool = False) -> LoadedModel:
    data_dir = model_dir.parent / "data"
    return load_model(
        ModelOptions(str(model_dir), "cpu", "float32", data_dir, trust_remote_code=trust_remote_code)
    )


@pytest.mark.parametrize("name", list(FAMILIES))
def test_tokenizer_files_of_each_family_load_and_round_trip(name: str, tmp_path: Path) -> None:
    model_dir = save_family_model(name, tmp_path / name)
    family = FAMILIES[name]
    shipped = {"sentencepiece": "tokenizer.model", "tiktoken": "tokenizer.model", "bpe": "tokenizer.json"}[
        family.tokenizer
    ]
    assert [p.name for p in model_dir.glob("tokenizer.*")] == [shipped]  # the only tokenizer file
    loaded = _load(model_dir)
    tokenizer = loaded.tokenizer
    reference = tiktoken_encoding() if family.tokenizer == "tiktoken" else None
    for text in [*corpus(num_lines=5, seed=3), "Unseen: ß, 漢字 and 🙂 (byte fallback)."]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert loaded.decode(ids) == text
        assert max(ids) < loaded.vocab_size
        if reference is not None:  # converted by transformers, it splits as tiktoken does
            assert ids == reference.encode(text)
    assert tokenizer.eos_token == family.specials["eos"]
    assert loaded.eos_ids == {tokenizer.eos_token_id}
    if family.specials["bos"] and family.tokenizer != "tiktoken":  # only when a request asks for them
        assert tokenizer.encode("a")[0] == tokenizer.bos_token_id
        assert tokenizer.encode("a", add_special_tokens=False)[0] != tokenizer.bos_token_id


@pytest.mark.parametrize("name", ["mistral", "gemma"])  # gemma: tied input/output embeddings
def test_sharded_safetensors_load_and_fingerprint_as_unsharded(name: str, tmp_path: Path) -> None:
    whole = save_family_model(name, tmp_path / "whole", seed=9)
    sharded = save_family_model(name, tmp_path / "sharded", seed=9, max_shard_size="30KB")
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert (sharded / "model.safetensors.index.json").exists() and len(shards) >= 3, shards
    assert not (sharded / "model.safetensors").exists()
    one, many = _load(whole), _load(sharded)
    assert one.model.state_dict().keys() == many.model.state_dict().keys()
    for key, value in one.model.state_dict().items():
        assert torch.equal(value, many.model.state_dict()[key]), key
    # as the server computes it at start-up (app.py): prefixes stored for one serve the other
    assert model_fingerprint(one.model, one.model.config) == model_fingerprint(many.model, many.model.config)


def test_model_code_runs_only_when_trusted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model_dir = save_remote_code_model(tmp_path / "remote")
    with pytest.raises(ModelSourceError, match=r"--trust-remote-code true") as refused:
        _load(model_dir)
    assert REMOTE_CODE_FILE in str(refused.value) and "\n" not in str(refused.value)
    with caplog.at_level(logging.INFO, logger="server.engine.model_loader"):
        loaded = _load(model_dir, trust_remote_code=True)
    assert type(loaded.model).__name__ == "TinyRemoteForCausalLM"
    assert type(loaded.model).__module__.startswith("transformers_modules.")  # the shipped file's class
    assert (
        f"--trust-remote-code: running the code model {model_dir} ships ({REMOTE_CODE_FILE})" in caplog.text
    )


def test_an_auto_map_of_a_type_transformers_knows_needs_no_trust(tmp_path: Path) -> None:
    """Phi-3 repositories name their own modeling files in auto_map; transformers' phi3 is used."""
    model_dir = save_family_model("phi-3", tmp_path / "phi3")
    assert locate_model(str(model_dir), trust_remote_code=False).code_files == (
        "configuration_phi3.py",
        "modeling_phi3.py",
    )
    loaded = _load(model_dir)
    assert type(loaded.model).__module__ == "transformers.models.phi3.modeling_phi3"


def test_a_hub_id_not_cached_fails_at_once_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the default: offline
    with pytest.raises(ModelSourceError) as missing:
        locate_model("acme/not-cached-anywhere", trust_remote_code=False)
    message = str(missing.value)
    assert "point --model at a local directory" in message and "not in the Hugging Face cache" in message
    with pytest.raises(ModelSourceError, match="no such directory"):
        locate_model(str(tmp_path / "typo"), trust_remote_code=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="has no config.json"):
        locate_model(str(tmp_path / "empty"), trust_remote_code=False)


def test_a_sliding_window_caps_the_context(tmp_path: Path) -> None:
    """Mistral v0.1 attends to the last `sliding_window` positions only; the engine attends to all
    of a row, which is exact while the row fits the window: the window becomes the context."""
    model_dir = save_family_model("mistral", tmp_path / "mistral")
    assert _load(model_dir).max_positions == 256  # the window (4096) is beyond max_position_embeddings
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "sliding_window": 64}))
    assert _load(model_dir).max_positions == 64


def test_a_model_type_transformers_lacks_and_no_code_is_refused(tmp_path: Path) -> None:
    model_dir = save_remote_code_model(tmp_path / "remote")
    (model_dir / REMOTE_CODE_FILE).unlink()
    config = json.loads((model_dir / "config.json").read_text())
    del config["auto_map"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match=r"has no model type 'tiny-remote' .* ships no code for it"):
        locate_model(str(model_dir), trust_remote_code=True)
