"""`prefix-train` on a tiny model: it learns, leaves the LM untouched, exports what the
server serves, and the server's greedy answers equal the trainer's own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import safetensors
import safetensors.torch
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, ByT5Tokenizer

from prefix_store.fingerprint import model_fingerprint, prefix_spec_for
from prefix_store.sources import parse_source
from tests.server_process import ServerProcess
from tests.tiny_models import save_tiny_model
from trainer.data import DataError, read_jsonl
from trainer.evaluate import evaluate, score
from trainer.prefix import (
    canonical_prefix,
    export,
    greedy,
    init_from_text,
    load_base,
    prefix_model,
    weights_digest,
)
from trainer.train import TrainResult, build_parser, main, train

PREFIX_LEN = 4
INPUTS = ["cat:", "dog:", "owl:", "fox:", "bee:", "elk:"]


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainResult]:
    """One short training run shared by the tests below: answer every word with the same phrase."""
    root = tmp_path_factory.mktemp("train")
    model_dir = save_tiny_model("gpt2", root / "model")
    rows = [{"input": w, "output": " fine"} for w in INPUTS]
    data = _write_jsonl(root / "train.jsonl", rows)
    args = build_parser().parse_args(
        ["--model", str(model_dir), "--data", str(data), "--eval", str(data), "--out", str(root / "out"),
         "--prefix-len", str(PREFIX_LEN), "--mlp-hidden", "32", "--max-steps", "20", "--batch-size", "6",
         "--lr", "3e-2", "--quiet", "--patience", "20"]
    )  # fmt: skip
    return model_dir, train(args)


def test_loss_falls_by_at_least_30_percent(trained: tuple[Path, TrainResult]) -> None:
    _, result = trained
    assert result.train_losses[-1] <= 0.7 * result.train_losses[0], result.train_losses
    assert result.trainable_params < result.total_params


def test_base_weights_are_bit_identical_after_training(trained: tuple[Path, TrainResult]) -> None:
    model_dir, result = trained
    on_disk = AutoModelForCausalLM.from_pretrained(model_dir)
    assert weights_digest(result.model.get_base_model()) == weights_digest(on_disk)


def test_export_is_canonical_without_mlp_weights(trained: tuple[Path, TrainResult]) -> None:
    model_dir, result = trained
    with safetensors.safe_open(str(result.prefix_path), "pt") as f:
        assert list(f.keys()) == ["prefix"]  # the MLP is dropped: only P = MLP(P') is kept
        metadata = f.metadata()
        prefix = f.get_tensor("prefix")
    assert list(prefix.shape) == [2, 2, 4, PREFIX_LEN, 8]  # tiny gpt2: 2 layers, 4 heads of 8
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert metadata["model_fingerprint"] == model_fingerprint(base, base.config)
    peft_dir = result.prefix_path.parent / "peft"
    assert (peft_dir / "adapter_config.json").exists() and (peft_dir / "adapter_model.safetensors").exists()


def test_served_greedy_equals_trainer_greedy_and_foreign_prefix_is_refused(
    trained: tuple[Path, TrainResult], tmp_path: Path
) -> None:
    model_dir, result = trained
    tokenizer = ByT5Tokenizer()
    expected = {
        w: greedy(result.model, tokenizer.encode(w, add_special_tokens=False), 6, tokenizer.eos_token_id)
        for w in INPUTS
    }
    other_dir = save_tiny_model("gpt2", tmp_path / "other", seed=1)  # same shape, other weights
    other, _ = load_base(str(other_dir))
    foreign = export(prefix_model(other, PREFIX_LEN, 32), str(other_dir), tmp_path / "foreign")
    with ServerProcess(tmp_path / "data", "--model", str(model_dir)) as server, httpx.Client(timeout=60) as c:
        put = c.put(
            server.url + "/admin/prefixes/t:reverse",
            files={"weights": ("p.safetensors", result.prefix_path.read_bytes())},
            headers=server.admin_headers,
        )
        assert put.status_code == 201, put.text
        for word, want in expected.items():
            body = {"task_id": "t:reverse", "prompt": word, "max_new_tokens": 6, "temperature": 0}
            got = c.post(server.url + "/generate", json=body).json()
            assert got["token_ids"][: len(want)] == want, (word, got)
        # prefix-eval through the server scores exactly what the trainer itself would have said
        refs = {w: [" fine", " fine!"] for w in INPUTS}
        [served], _ = evaluate(server.url, {"t:reverse": refs}, max_new_tokens=6)
        mine = [str(tokenizer.decode(expected[w])).strip() for w in INPUTS]
        assert (served.bleu, served.rouge_l) == tuple(round(x, 2) for x in score(mine, list(refs.values())))
        refused = c.put(
            server.url + "/admin/prefixes/t:foreign",
            files={"weights": ("p.safetensors", foreign.read_bytes())},
            headers=server.admin_headers,
        )
        assert refused.status_code == 422 and "model_mismatch" in refused.text, refused.text


def test_bad_jsonl_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n\n{"input": "a"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: field 'output' must be a string"):
        read_jsonl(bad)
    bad.write_text('{"input": "a", "output": "b"}\nnot json\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: not valid JSON"):
        main(["--data", str(bad), "--out", str(tmp_path / "out"), "--model", "unused"])


def test_scores_of_perfect_and_wrong_answers() -> None:
    bleu, rouge = score(["the eagle is a pub"], [["a pub", "the eagle is a pub"]])
    assert round(bleu, 6) == 100 and rouge == 100
    bleu, rouge = score(["zzz qqq"], [["the eagle is a pub"]])
    assert bleu < 1 and rouge == 0


def test_init_text_starts_the_prefix_at_the_words_activations(tmp_path: Path) -> None:
    model_dir = save_tiny_model("gpt2", tmp_path / "model")
    base, tokenizer = load_base(str(model_dir))
    words = tokenizer.encode("hi", add_special_tokens=False)
    with torch.no_grad():
        cache = base(input_ids=torch.tensor([words * 2]), use_cache=True).past_key_values
    want = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
    plain = prefix_model(base, PREFIX_LEN, None)
    init_from_text(plain, tokenizer, "hi")  # 2 tokens repeated to P=4
    assert torch.allclose(canonical_prefix(plain), want)
    base2, _ = load_base(str(model_dir))
    with_mlp = prefix_model(base2, PREFIX_LEN, 32)
    init_from_text(with_mlp, tokenizer, "hi")
    before = torch.nn.functional.mse_loss(torch.zeros_like(want), want)
    assert torch.nn.functional.mse_loss(canonical_prefix(with_mlp), want) < 0.05 * before


def test_resume_continues_to_the_same_prefix_as_one_run(tmp_path: Path) -> None:
    model_dir = save_tiny_model("gpt2", tmp_path / "model")
    data = _write_jsonl(tmp_path / "d.jsonl", [{"input": w, "output": w.upper()} for w in INPUTS * 2])
    argv = ["--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "out"),
            "--batch-size", "4", "--prefix-len", "2", "--mlp-hidden", "8", "--save-steps", "2",
            "--max-steps", "6", "--quiet"]  # fmt: skip
    straight = safetensors.torch.load_file(train(build_parser().parse_args(argv)).prefix_path)["prefix"]
    shutil.rmtree(tmp_path / "out" / "checkpoints" / "checkpoint-6")  # as if stopped after step 4
    resumed_path = train(build_parser().parse_args([*argv, "--resume"])).prefix_path
    assert torch.allclose(straight, safetensors.torch.load_file(resumed_path)["prefix"], atol=1e-6)


def test_cartridge_trains_the_kv_with_its_first_token_frozen_and_exports_what_peft_and_the_server_load(
    tmp_path: Path,
) -> None:
    """`--method cartridge`: starts at the training text's activations, learns, keeps its first
    virtual token (the attention sink) fixed; PEFT loads the exported checkpoint as a CARTRIDGE and
    the server's parser makes the same canonical prefix of it as the exported one."""
    model_dir = save_tiny_model("gpt2", tmp_path / "model")
    rows = [{"input": w, "output": " fine"} for w in INPUTS]
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    base, tokenizer = load_base(str(model_dir))
    start = prefix_model(base, PREFIX_LEN, None, "cartridge")
    init_from_text(start, tokenizer, " ".join(r["input"] + r["output"] for r in rows))  # the default init
    initial = canonical_prefix(start)
    argv = ["--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "out"), "--method",
            "cartridge", "--prefix-len", str(PREFIX_LEN), "--max-steps", "20", "--batch-size", "6",
            "--lr", "2e-1", "--quiet"]  # fmt: skip
    result = train(build_parser().parse_args(argv))
    assert result.train_losses[-1] <= 0.7 * result.train_losses[0], result.train_losses
    exported = safetensors.torch.load_file(result.prefix_path)["prefix"]  # [layers, 2, heads, P, d]
    assert torch.equal(exported[:, :, :, :1], initial[:, :, :, :1])  # frozen sink
    assert not torch.allclose(exported[:, :, :, 1:], initial[:, :, :, 1:])  # the rest trained
    peft_dir = result.prefix_path.parent / "peft"
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "CARTRIDGE" and config["num_frozen_tokens"] == 1
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), peft_dir)
    assert torch.equal(canonical_prefix(reloaded), exported)
    spec = prefix_spec_for(base.config, torch.float32, 128)
    weights, config_json = (peft_dir / "adapter_model.safetensors").read_bytes(), json.dumps(config).encode()
    source = parse_source(spec, weights, config_json, None)
    assert source.kind == "cartridge" and source.kv is not None and torch.equal(source.kv, exported)


def test_quiet_prints_no_log_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--quiet` (as `make demo` trains): no progress bar and none of Trainer's per-step dicts."""
    model_dir = save_tiny_model("gpt2", tmp_path / "model")
    data = _write_jsonl(tmp_path / "d.jsonl", [{"input": w, "output": " ok"} for w in INPUTS])
    argv = ["--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "out"),
            "--batch-size", "2", "--prefix-len", "2", "--max-steps", "6", "--quiet"]  # fmt: skip
    result = train(build_parser().parse_args(argv))
    assert len(result.train_losses) >= 2  # it did log, to its history only
    out = capsys.readouterr()
    assert "{'loss':" not in out.out + out.err and "train_runtime" not in out.out + out.err, out
