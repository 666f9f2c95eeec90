"""An E2E-style table-to-text data set: meaning representation -> one sentence.

    name[The Eagle], eatType[pub], food[French], area[riverside] => The Eagle is a pub ...

Several references per MR (different wordings), train/dev/test split by MR so that test
MRs are never seen in training. Generated, no download; the sentences use the wording of
the demo model's pretraining corpus, the MR format is new to the model.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from trainer.demo_corpus import SLOTS, random_mr, restaurant_sentence

SEPARATOR = " => "


def mr_text(mr: dict[str, str]) -> str:
    return ", ".join(f"{slot}[{mr[slot]}]" for slot in SLOTS if slot in mr)


def unique_mrs(count: int, rng: random.Random, max_slots: int) -> list[dict[str, str]]:
    seen: dict[str, dict[str, str]] = {}
    while len(seen) < count:
        mr = random_mr(rng)
        keep = ["name"] + rng.sample([s for s in mr if s != "name"], min(max_slots - 1, len(mr) - 1))
        mr = {s: mr[s] for s in SLOTS if s in keep}
        seen.setdefault(mr_text(mr), mr)
    return list(seen.values())


def rows(mrs: list[dict[str, str]], refs: int, rng: random.Random) -> list[dict[str, str]]:
    out = []
    for mr in mrs:
        sentences = list(dict.fromkeys(restaurant_sentence(mr, rng) for _ in range(refs * 3)))[:refs]
        out += [{"input": mr_text(mr) + SEPARATOR, "output": s} for s in sentences]
    return out


def write(out: Path, train: int, dev: int, test: int, refs: int, seed: int, max_slots: int) -> None:
    rng = random.Random(seed)
    mrs = unique_mrs(train + dev + test, rng, max_slots)
    splits = {"train": mrs[:train], "dev": mrs[train : train + dev], "test": mrs[train + dev :]}
    out.mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        # training sees one reference per MR (more MRs beat more wordings); dev/test keep all
        lines = rows(part, 1 if name == "train" else refs, rng)
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("examples/table_to_text/data"))
    p.add_argument("--train", type=int, default=200)
    p.add_argument("--dev", type=int, default=20)
    p.add_argument("--test", type=int, default=30)
    p.add_argument("--refs", type=int, default=3)
    p.add_argument("--max-slots", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    write(a.out, a.train, a.dev, a.test, a.refs, a.seed, a.max_slots)


if __name__ == "__main__":
    main()
