"""JSONL examples `{"input": ..., "output": ...}` -> token ids with the loss on the output only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE = -100  # the label value transformers' loss skips


class DataError(ValueError):
    """A data file the trainer cannot use; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    input: str
    output: str


def read_jsonl(path: Path) -> list[Example]:
    """Every non-blank line must be a JSON object with string fields `input` and `output`."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc}): {line[:80]!r}") from exc
        if not isinstance(record, dict):
            raise DataError(f'{path}:{number}: expected an object {{"input": ..., "output": ...}}')
        for field in ("input", "output"):
            if not isinstance(record.get(field), str):
                raise DataError(
                    f"{path}:{number}: field {field!r} must be a string, got {record.get(field)!r}"
                )
        examples.append(Example(record["input"], record["output"]))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def encode_example(
    tokenizer: Any, example: Example, eos_id: int | None, max_len: int
) -> dict[str, list[int]]:
    """Prompt ids exactly as the server encodes a prompt (no special tokens), then the output
    ids and EOS; labels are IGNORE on the prompt so that only the output is learned."""
    prompt = list(tokenizer.encode(example.input, add_special_tokens=False))
    target = list(tokenizer.encode(example.output, add_special_tokens=False))
    if eos_id is not None:
        target.append(eos_id)
    ids = (prompt + target)[:max_len]
    labels = ([IGNORE] * len(prompt) + target)[:max_len]
    return {"input_ids": ids, "labels": labels}


def collate(pad_id: int, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of attention and loss."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
