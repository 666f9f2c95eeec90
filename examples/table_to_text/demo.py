"""`make demo`: train three small prefix tasks on the demo model, upload them to a server and
print one mixed batch of their answers side by side.

Small on purpose (a few minutes on 2 CPU cores): 120 training examples, P=8, 300 steps each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import torch

from clients.client import AsyncPrefixClient, PrefixClient
from examples.table_to_text.make_data import mr_text, unique_mrs
from examples.table_to_text.serve import demo_server
from trainer.demo_corpus import NAMES, restaurant_sentence
from trainer.train import build_parser, train

CITIES = ["Cambridge", "London", "Oxford", "York", "Bristol", "Leeds", "Bath"]
SKIES = ["sunny", "cloudy", "rainy", "windy", "foggy"]


def _weather(rng: random.Random) -> dict[str, str]:
    city, sky, high = rng.choice(CITIES), rng.choice(SKIES), rng.randint(8, 28)
    return {
        "input": f"city[{city}], sky[{sky}], high[{high}] => ",
        "output": f"Today in {city} it will be {sky} with a high of {high} degrees.",
    }


def _greeting(rng: random.Random) -> dict[str, str]:
    place = rng.choice(NAMES)
    return {
        "input": f"greet name[{place}] => ",
        "output": f"Hello! Welcome to {place}. How can I help you today?",
    }


def datasets(n: int, seed: int) -> dict[str, list[dict[str, str]]]:
    rng = random.Random(seed)
    mrs = unique_mrs(n, rng, 3)
    return {
        "demo:restaurant": [
            {"input": mr_text(m) + " => ", "output": restaurant_sentence(m, rng)} for m in mrs
        ],
        "demo:weather": [_weather(rng) for _ in range(n)],
        "demo:greeter": [_greeting(rng) for _ in range(n)],
    }


async def _mixed_batch(url: str, prompts: list[tuple[str, str]]) -> list[str]:
    async with AsyncPrefixClient(url) as client:
        outs = await asyncio.gather(
            *(client.generate(t, p, max_new_tokens=80, temperature=0.0) for t, p in prompts)
        )
    return [o.text for o in outs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/prefix-demo"))
    p.add_argument("--examples", type=int, default=120)
    p.add_argument("--max-steps", type=int, default=300)
    a = p.parse_args()
    torch.set_num_threads(1)  # on a shared 2-core machine one thread trains ~4x faster than two
    start = time.monotonic()
    sets = datasets(a.examples + 2, seed=1)
    paths = {}
    for task, rows in sets.items():
        folder = a.work / task.replace(":", "_")
        folder.mkdir(parents=True, exist_ok=True)
        data = folder / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows[2:]))  # rows 0-1 are held out
        argv = ["--data", str(data), "--out", str(folder), "--prefix-len", "8", "--max-steps",
                str(a.max_steps), "--batch-size", "8", "--lr", "1e-2", "--quiet"]  # fmt: skip
        result = train(build_parser().parse_args(argv))
        paths[task] = result.prefix_path
        print(f"trained {task}: loss {result.train_losses[0]:.2f} -> {result.train_losses[-1]:.2f} "
              f"in {result.seconds:.0f}s")  # fmt: skip
    with demo_server() as server:
        with PrefixClient(server.url, token=server.admin_token) as client:
            for task, path in paths.items():
                client.upload(task, path)
        prompts = [(task, row["input"]) for task, rows in sets.items() for row in rows[:2]]
        random.Random(0).shuffle(prompts)  # one batch, tasks interleaved
        answers = asyncio.run(_mixed_batch(server.url, prompts))
    print(f"\none mixed batch ({len(prompts)} requests, 3 tasks):")
    for (task, prompt), answer in sorted(zip(prompts, answers, strict=True)):
        print(f"{task:<16} {prompt:<58} | {answer.strip()}")
    print(f"\nmake demo took {time.monotonic() - start:.0f}s")


if __name__ == "__main__":
    main()
