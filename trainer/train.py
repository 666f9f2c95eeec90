"""`prefix-train`: JSONL examples -> a canonical prefix for the served model (-> upload).

PEFT prefix tuning (`prefix_projection=True` by default: P = MLP(P') while training, only P
exported) under transformers' `Trainer`: progress bar with loss, eval loss each epoch, early
stopping on it, `--seed` for determinism, `--resume` from the last checkpoint in `--out`.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from peft import PeftModel
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

from trainer.data import DataError, collate, encode_example, read_jsonl
from trainer.prefix import METHODS, export, init_from_text, load_base, prefix_model, weights_digest


def default_model() -> str:
    """The server's default: the committed demo model."""
    from server.engine.demo_model import DEMO_WEIGHTS

    return str(DEMO_WEIGHTS)


_ENCODER_FILE = "prompt_encoder.safetensors"


@dataclass
class TrainResult:
    prefix_path: Path
    train_losses: list[float]  # logged training loss, in order
    eval_loss: float | None
    trainable_params: int
    total_params: int
    seconds: float
    model: PeftModel  # the trained model (prefix encoder included), for evaluation in-process


class _KeepBest(TrainerCallback):
    """Early stopping on eval loss that keeps the best prefix in memory.

    transformers' `load_best_model_at_end` cannot reload a prompt-learning checkpoint (PEFT
    saves P with the MLP folded in), so the best prompt encoder state is copied here instead.
    """

    def __init__(self, model: PeftModel, patience: int) -> None:
        self.encoder = model.prompt_encoder[model.active_adapter]
        self.patience = patience
        self.best: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_evals = 0

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kw: Any
    ) -> None:
        loss = (metrics or {}).get("eval_loss")
        if loss is None:
            return
        if self.best is None or loss < self.best:
            self.best, self.bad_evals = loss, 0
            self.best_state = {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}
        else:
            self.bad_evals += 1
            control.should_training_stop = self.bad_evals >= self.patience

    def restore(self) -> None:
        if self.best_state is not None:
            self.encoder.load_state_dict(self.best_state)


class _PrefixTrainer(Trainer):
    """`Trainer` whose checkpoints resume a prefix with its MLP.

    PEFT's `save_pretrained` folds the MLP into P, so a checkpoint it wrote cannot be loaded back
    into a model that still has the MLP; the prompt encoder's own weights are saved beside it.
    """

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        encoder: Any = self.model.prompt_encoder[self.model.active_adapter]  # type: ignore[union-attr,index]
        folder = Path(output_dir or str(self.args.output_dir))
        safetensors.torch.save_file(
            {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}, folder / _ENCODER_FILE
        )

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        encoder: Any = self.model.prompt_encoder[self.model.active_adapter]  # type: ignore[union-attr,index]
        encoder.load_state_dict(safetensors.torch.load_file(Path(resume_from_checkpoint) / _ENCODER_FILE))


class _TokensPerSecond(TrainerCallback):
    """Adds tokens/s (input tokens seen, padding included) to every log line and the bar."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
    ) -> None:
        if logs is not None and state.num_input_tokens_seen:
            logs["tokens_per_s"] = round(state.num_input_tokens_seen / (time.monotonic() - self.start), 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prefix-train", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF hub id or local dir, as for the server (default: demo)")
    p.add_argument("--data", type=Path, required=True, help='train JSONL, one {"input", "output"} a line')
    p.add_argument("--eval", type=Path, default=None, help="eval JSONL (eval loss each epoch, early stop)")
    p.add_argument(
        "--method",
        choices=METHODS,
        default="prefix",
        help="prefix: prefix tuning (Li & Liang); cartridge: PEFT CARTRIDGE (the KV trained)",
    )
    p.add_argument("--prefix-len", type=int, default=10)
    p.add_argument("--mlp-hidden", type=int, default=512, help="MLP reparameterisation width; 0 = none")
    p.add_argument("--epochs", type=float, default=5.0)
    p.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=256, help="input+output tokens per example, cut beyond")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patience", type=int, default=3, help="epochs without eval improvement before stopping")
    p.add_argument(
        "--init-text",
        default=None,
        help="start the prefix at these words' activations (a Cartridge, by default, at the "
        "first training examples')",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--save-steps", type=int, default=200, help="checkpoint every N steps (for --resume)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no log lines")
    p.add_argument("--upload", default=None, metavar="URL", help="server URL to upload the prefix to")
    p.add_argument("--task-id", default=None, help="task id for --upload (admin token: $PREFIX_ADMIN_TOKEN)")
    return p


def _training_arguments(args: argparse.Namespace, num_train_rows: int, has_eval: bool) -> TrainingArguments:
    """transformers' options for the run `args` asks for (checkpoints every --save-steps, for --resume)."""
    return TrainingArguments(
        output_dir=str(args.out / "checkpoints"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        seed=args.seed,
        data_seed=args.seed,
        eval_strategy="epoch" if has_eval else "no",
        save_strategy="steps",  # checkpoints for --resume
        save_steps=args.save_steps,
        save_total_limit=2,
        logging_steps=max(1, min(10, num_train_rows // args.batch_size)),
        include_num_input_tokens_seen="all",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=args.quiet,
        remove_unused_columns=False,
        save_only_model=False,
    )


def train(args: argparse.Namespace) -> TrainResult:
    """Train, check the base model is untouched, export; see `build_parser` for the options."""
    examples = read_jsonl(args.data)  # bad data fails before the model is loaded
    eval_examples = read_jsonl(args.eval) if args.eval else None
    set_seed(args.seed)
    source = args.model or default_model()
    base, tokenizer = load_base(source)
    before = weights_digest(base)
    model = prefix_model(base, args.prefix_len, args.mlp_hidden or None, args.method)
    init_text = args.init_text
    if init_text is None and args.method == "cartridge":  # the Cartridges paper: real activations, not noise
        init_text = " ".join(e.input + e.output for e in examples[:8])
    if init_text:
        init_from_text(model, tokenizer, init_text)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = pad if pad is not None else (eos if eos is not None else 0)
    encode = functools.partial(encode_example, tokenizer, eos_id=eos, max_len=args.max_len)
    train_rows = [encode(e) for e in examples]
    eval_rows = [encode(e) for e in eval_examples] if eval_examples else None
    targs = _training_arguments(args, len(train_rows), has_eval=eval_rows is not None)
    keep_best = _KeepBest(model, args.patience)
    callbacks: list[TrainerCallback] = [_TokensPerSecond(), keep_best]
    trainer = _PrefixTrainer(
        model=model,
        args=targs,
        train_dataset=train_rows,  # type: ignore[arg-type]
        eval_dataset=eval_rows,  # type: ignore[arg-type]
        data_collator=functools.partial(collate, pad),
        callbacks=callbacks,
    )
    if args.quiet:  # with its bar off, Trainer prints every log dict instead: quiet means neither
        trainer.remove_callback(PrinterCallback)
    start = time.monotonic()
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    seconds = time.monotonic() - start
    keep_best.restore()
    if weights_digest(model.get_base_model()) != before:  # the method's premise: the LM is frozen
        raise AssertionError("the base model's weights changed during prefix training")
    eval_loss = trainer.evaluate()["eval_loss"] if eval_rows else None
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trainable, total = model.get_nb_trainable_parameters()
    path = export(model, source, args.out)
    return TrainResult(path, losses, eval_loss, trainable, total, seconds, model)


def upload(path: Path, url: str, task_id: str) -> None:
    from clients.client import PrefixClient

    token = os.environ.get("PREFIX_ADMIN_TOKEN")
    with PrefixClient(url, token=token) as client:
        info = client.upload(task_id, path)
    print(f"uploaded {task_id}: {info}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.upload and not args.task_id:
        sys.exit("prefix-train: --upload needs --task-id")
    try:
        result = train(args)
    except DataError as exc:
        sys.exit(f"prefix-train: {exc}")
    print(
        f"prefix -> {result.prefix_path} (PEFT checkpoint in {args.out / 'peft'}); "
        f"trainable {result.trainable_params:,} of {result.total_params:,} parameters while training; "
        f"final train loss {result.train_losses[-1] if result.train_losses else float('nan'):.4f}, "
        f"eval loss {result.eval_loss}, {result.seconds:.1f}s"
    )
    if args.upload:
        upload(result.prefix_path, args.upload, args.task_id)


if __name__ == "__main__":
    main()
