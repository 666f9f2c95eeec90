"""The paper's table-to-text comparison in miniature, on the demo model, measured through the server.

    python examples/table_to_text/compare.py --out docs/training_results.json

(a) no prefix (a one-token text prefix ".": the server needs a task), (b) a text instruction with
one demonstration as a text prefix, (c) prefix-tuning P=10 with and without the MLP
reparameterisation, and a Cartridge (the KV itself trained, from the training text),
(d) full fine-tuning of the same model (offline: the paper's baseline, not something the server
serves), and a prefix-length sweep (1, 5, 10, 20). Every served variant is one task on one
server and all of them are evaluated at once by `prefix-eval`'s `evaluate` (mixed batches).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from clients.client import PrefixClient
from examples.table_to_text.make_data import write
from examples.table_to_text.serve import demo_server
from trainer.data import collate, encode_example, read_jsonl
from trainer.evaluate import evaluate, group_references, score
from trainer.prefix import greedy, load_base
from trainer.train import build_parser, default_model, train

INSTRUCTION = (
    "Write one sentence about the restaurant.\n"
    "name[The Mill], food[Indian], area[riverside] => The Mill serves Indian food in the riverside.\n"
)


def train_prefix(
    data: Path, out: Path, prefix_len: int, mlp: int, a: argparse.Namespace, method: str = "prefix"
) -> dict[str, Any]:
    argv = ["--data", str(data / "train.jsonl"), "--eval", str(data / "dev.jsonl"), "--out", str(out),
            "--prefix-len", str(prefix_len), "--mlp-hidden", str(mlp), "--epochs", str(a.epochs),
            "--lr", str(a.lr), "--batch-size", "8", "--seed", "0", "--quiet", "--method", method]  # fmt: skip
    result = train(build_parser().parse_args(argv))
    spec = result.model.active_peft_config
    served = spec.num_layers * spec.token_dim * 2 * prefix_len
    base_params = result.total_params - result.trainable_params
    return {
        "path": result.prefix_path,
        "train_s": round(result.seconds, 1),
        "trainable_frac": result.trainable_params / base_params,
        "served_frac": served / base_params,
    }


def full_finetune(data: Path, a: argparse.Namespace) -> dict[str, Any]:
    """All weights trained (same data, epochs), scored offline with the trainer's greedy decoder."""
    model, tokenizer = load_base(default_model())
    model.requires_grad_(True)
    rows = [
        encode_example(tokenizer, e, tokenizer.eos_token_id, 256) for e in read_jsonl(data / "train.jsonl")
    ]
    args = TrainingArguments(
        output_dir=str(data / "ft"), per_device_train_batch_size=8, learning_rate=a.ft_lr,
        num_train_epochs=a.epochs, report_to="none", use_cpu=True, disable_tqdm=True,
        save_strategy="no", remove_unused_columns=False, seed=0,
    )  # fmt: skip
    start = time.monotonic()
    Trainer(model=model, args=args, train_dataset=rows, data_collator=lambda b: collate(0, b)).train()  # type: ignore[arg-type]
    seconds = time.monotonic() - start
    refs = group_references(read_jsonl(data / "test.jsonl"))
    hyps = [
        tokenizer.decode(greedy(model, tokenizer.encode(i, add_special_tokens=False), a.max_new_tokens, 1))
        for i in refs
    ]
    bleu, rouge = score([h.strip() for h in hyps], list(refs.values()))
    return {
        "bleu": round(bleu, 2),
        "rouge_l": round(rouge, 2),
        "train_s": round(seconds, 1),
        "trainable_frac": 1.0,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    """BLEU and ROUGE-L against prefix length, with the baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    sweep = sorted(
        (int(k.split("=")[1]), v) for k, v in rows.items() if k.startswith("prefix P=") and "," not in k
    )
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for metric, color in (("bleu", "tab:blue"), ("rouge_l", "tab:orange")):
        ax.plot(
            [n for n, _ in sweep], [v[metric] for _, v in sweep], "o-", color=color, label=f"prefix {metric}"
        )
        ax.axhline(
            rows["full fine-tuning (offline)"][metric],
            color=color,
            ls="--",
            lw=1,
            label=f"fine-tune {metric}",
        )
        ax.axhline(rows["no prefix"][metric], color=color, ls=":", lw=1, label=f"no prefix {metric}")
    ax.set_xscale("log")
    ax.set_xticks([n for n, _ in sweep], [str(n) for n, _ in sweep])
    ax.set_xlabel("prefix length P")
    ax.set_title("E2E-style table-to-text on the demo model (test MRs unseen)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/table_to_text"))
    p.add_argument("--out", type=Path, default=Path("docs/training_results.json"))
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--sweep", default="1,5,10,20")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from --out")
    p.add_argument("--train", type=int, default=200, help="training MRs (one reference each)")
    p.add_argument("--max-new-tokens", type=int, default=80)
    a = p.parse_args()
    torch.set_num_threads(1)  # on a shared 2-core machine one thread trains ~4x faster than two
    if a.plot_only:
        plot(json.loads(a.out.read_text()), a.out.with_suffix(".png"))
        return
    torch.manual_seed(0)
    data = a.work / "data"
    write(data, train=a.train, dev=20, test=30, refs=3, seed=0, max_slots=4)
    rows: dict[str, dict[str, Any]] = {}
    trained = {
        f"prefix P={n}": train_prefix(data, a.work / f"p{n}", n, 512, a) for n in map(int, a.sweep.split(","))
    }
    trained["prefix P=10, no MLP"] = train_prefix(data, a.work / "p10-nomlp", 10, 0, a)
    trained["Cartridge P=10"] = train_prefix(data, a.work / "cartridge", 10, 0, a, method="cartridge")
    with demo_server() as server, PrefixClient(server.url, token=server.admin_token) as client:
        client.upload_text("t2t:none", ".")  # the server needs a task: one neutral token
        client.upload_text("t2t:text", INSTRUCTION)
        tasks = {"t2t:none": "no prefix", "t2t:text": "text instruction + 1 example"}
        for i, (name, info) in enumerate(trained.items()):
            client.upload(f"t2t:{i}", info["path"])
            tasks[f"t2t:{i}"] = name
        refs = group_references(read_jsonl(data / "test.jsonl"))
        scores, tokens_per_s = evaluate(server.url, dict.fromkeys(tasks, refs), a.max_new_tokens)
    for s in scores:
        info = trained.get(tasks[s.task_id], {})
        rows[tasks[s.task_id]] = {
            "bleu": s.bleu,
            "rouge_l": s.rouge_l,
            **{k: v for k, v in info.items() if k != "path"},
        }
    rows["full fine-tuning (offline)"] = full_finetune(data, a)
    report = {
        "rows": rows,
        "served_tokens_per_s": round(tokens_per_s, 1),
        "epochs": a.epochs,
        "test_mrs": len(refs),
    }
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, a.out.with_suffix(".png"))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
