"""`prefix-eval`: every example of one or more eval sets through a running server, all tasks
at once (so their requests share mixed batches), scored with BLEU (sacrebleu) and ROUGE-L
(rouge-score) per task; JSON out.

    prefix-eval --url http://127.0.0.1:8000 --task e2e:p10=test.jsonl --task e2e:text=test.jsonl

Lines of an eval set with the same `input` are that input's references (E2E has several).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer.data import DataError, Example, read_jsonl


@dataclass(frozen=True)
class TaskScore:
    task_id: str
    examples: int  # distinct inputs
    bleu: float  # sacrebleu corpus BLEU, 0-100
    rouge_l: float  # mean ROUGE-L F1 against the best reference, 0-100
    generated_tokens: int


def group_references(examples: list[Example]) -> dict[str, list[str]]:
    """input -> its references, in file order."""
    refs: dict[str, list[str]] = {}
    for e in examples:
        refs.setdefault(e.input, []).append(e.output)
    return refs


def score(hypotheses: list[str], references: list[list[str]]) -> tuple[float, float]:
    """(BLEU, ROUGE-L F1), both 0-100, of hypotheses against their reference lists."""
    import sacrebleu
    from rouge_score import rouge_scorer

    width = max(len(r) for r in references)
    # sacrebleu wants as many reference streams as the most references; repeating a reference
    # changes neither clipped counts nor the closest reference length.
    streams = [[refs[min(i, len(refs) - 1)] for refs in references] for i in range(width)]
    bleu = sacrebleu.corpus_bleu(hypotheses, streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [
        scorer.score_multi(refs, hyp)["rougeL"].fmeasure
        for hyp, refs in zip(hypotheses, references, strict=True)
    ]
    return bleu, 100 * sum(rouge) / len(rouge)


async def _generate_all(
    url: str, api_key: str | None, jobs: list[tuple[str, str]], max_new_tokens: int, concurrency: int
) -> list[tuple[str, int]]:
    from clients.client import AsyncPrefixClient

    gate = asyncio.Semaphore(concurrency)
    async with AsyncPrefixClient(url, api_key=api_key) as client:

        async def one(task_id: str, prompt: str) -> tuple[str, int]:
            async with gate:
                out = await client.generate(task_id, prompt, max_new_tokens=max_new_tokens, temperature=0.0)
            return out.text, out.completion_tokens

        return await asyncio.gather(*(one(t, p) for t, p in jobs))


def evaluate(
    url: str,
    tasks: dict[str, dict[str, list[str]]],
    max_new_tokens: int = 64,
    concurrency: int = 32,
    api_key: str | None = None,
) -> tuple[list[TaskScore], float]:
    """Send every task's inputs, interleaved in one shuffled stream, and score each task.
    Returns the scores and the generated tokens per second over the whole run."""
    jobs = [(task_id, prompt) for task_id, refs in tasks.items() for prompt in refs]
    order = list(range(len(jobs)))
    random.Random(0).shuffle(order)  # tasks mixed in time, so batches mix tasks
    start = time.monotonic()
    answers = asyncio.run(_generate_all(url, api_key, [jobs[i] for i in order], max_new_tokens, concurrency))
    seconds = time.monotonic() - start
    by_job = {order[k]: answers[k] for k in range(len(jobs))}
    scores, i, total_tokens = [], 0, 0
    for task_id, refs in tasks.items():
        outs = [by_job[i + k] for k in range(len(refs))]
        i += len(refs)
        bleu, rouge = score([o[0].strip() for o in outs], list(refs.values()))
        tokens = sum(o[1] for o in outs)
        total_tokens += tokens
        scores.append(TaskScore(task_id, len(refs), round(bleu, 2), round(rouge, 2), tokens))
    return scores, total_tokens / seconds if seconds > 0 else 0.0


def _task_arg(value: str) -> tuple[str, Path]:
    task_id, sep, path = value.partition("=")
    if not sep or not task_id or not path:
        raise argparse.ArgumentTypeError(f"expected TASK_ID=EVAL.jsonl, got {value!r}")
    return task_id, Path(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="prefix-eval", description=__doc__.splitlines()[0])
    p.add_argument("--url", default=os.environ.get("PREFIX_URL", "http://127.0.0.1:8000"))
    p.add_argument("--task", type=_task_arg, action="append", required=True, metavar="TASK_ID=EVAL.jsonl")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = p.parse_args(argv)
    try:
        tasks = {task_id: group_references(read_jsonl(path)) for task_id, path in args.task}
    except DataError as exc:
        sys.exit(f"prefix-eval: {exc}")
    api_key = os.environ.get("PREFIX_API_KEY")
    scores, tokens_per_s = evaluate(args.url, tasks, args.max_new_tokens, args.concurrency, api_key)
    report = {"tasks": [asdict(s) for s in scores], "tokens_per_s": round(tokens_per_s, 1)}
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
