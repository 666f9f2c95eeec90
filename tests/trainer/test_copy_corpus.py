"""The copy-teaching corpus: every value is in both the record and its sentence, the demo tasks'
values never appear, and the held-out copy metric counts exactly the values predicted in full."""

from __future__ import annotations

import math
import random
import re
from types import SimpleNamespace

import torch

from trainer.copy_corpus import code_document, copy_document, record
from trainer.demo_corpus import CITIES, NAMES, corpus
from trainer.pretrain_demo import BYTE_OFFSET, copy_accuracy, copy_probe, repeat_loss


def test_records_show_every_value_and_the_sentence_copies_it() -> None:
    rng = random.Random(0)
    for _ in range(500):
        source, sentence, values = record(rng)
        assert source.endswith(" => ")
        for value in values:
            assert f"[{value}]" in source
            assert re.search(rf"(?<!\w){re.escape(value)}(?!\w)", sentence), (value, sentence)


def test_copy_documents_avoid_the_demo_tasks_values() -> None:
    rng = random.Random(1)
    docs = [copy_document(rng) for _ in range(3000)]
    for value in NAMES + CITIES:
        assert not any(re.search(rf"\b{re.escape(value)}\b", doc) for doc in docs), value
    assert len({d.split(" ")[0] for d in docs}) > 1000  # values from large pools, not a short list


def test_corpus_is_deterministic_and_mixes_copy_text_with_the_rest() -> None:
    docs = corpus(2000, seed=3)
    assert docs == corpus(2000, seed=3)
    with_records = sum(" => " in d for d in docs)
    assert 0.2 * len(docs) < with_records < 0.4 * len(docs)
    assert sum(d.startswith("Hello") for d in docs) > 50
    heavy = corpus(2000, seed=3, copy_frac=0.8)
    assert sum(" => " in d for d in heavy) > 0.4 * len(heavy)


def test_open_names_make_up_the_greetings_venues_and_the_weathers_towns() -> None:
    def places(docs: list[str]) -> set[str]:
        found = {m for d in docs for m in re.findall(r"Welcome to (.+?)\. How", d)}
        return found | {m for d in docs for m in re.findall(r"in (\w+) it will be", d)}

    closed, opened = places(corpus(3000, seed=4)), places(corpus(3000, seed=4, open_names=0.5))
    assert closed <= set(NAMES + CITIES)
    assert len(opened - set(NAMES + CITIES)) > 100 and opened & set(NAMES + CITIES)


class _Oracle(torch.nn.Module):
    """Predicts the true next byte everywhere except the bytes listed in `wrong` (sentence offsets)."""

    def __init__(self, text: bytes, wrong: set[int]) -> None:
        super().__init__()
        self.text, self.wrong = text, wrong

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        nxt = list(self.text[1:]) + [0]
        logits = torch.zeros(1, len(nxt), 384)
        for i, byte in enumerate(nxt):
            logits[0, i, byte + BYTE_OFFSET + (1 if i + 1 in self.wrong else 0)] = 1.0
        return SimpleNamespace(logits=logits)


def test_copy_accuracy_counts_values_predicted_in_full() -> None:
    source, sentence, values = copy_probe(1, seed=5)[0]
    text = (source + sentence).encode()
    assert copy_accuracy(_Oracle(text, set()), [(source, sentence, values)]) == (1.0, 1.0)  # type: ignore[arg-type]
    # one wrong byte inside the first value's occurrence in the sentence: that value is missed
    first = re.search(rf"(?<!\w){re.escape(values[0])}(?!\w)", sentence)
    assert first is not None
    at = len(source.encode()) + first.start() + len(values[0]) - 1
    missed = copy_accuracy(_Oracle(text, {at}), [(source, sentence, values)])  # type: ignore[arg-type]
    num_bytes = sum(len(v.encode()) for v in values)
    assert missed == ((len(values) - 1) / len(values), (num_bytes - 1) / num_bytes)


class _NextByte(torch.nn.Module):
    """Logits `sure` on the true next byte everywhere (0: uniform over the 384 ids)."""

    def __init__(self, sure: float) -> None:
        super().__init__()
        self.sure = sure

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        logits = torch.zeros(1, input_ids.shape[1], 384)
        logits[0, torch.arange(input_ids.shape[1] - 1), input_ids[0, 1:]] = self.sure
        return SimpleNamespace(logits=logits)


def test_repeat_loss_is_nats_a_byte_on_the_repeat() -> None:
    assert abs(repeat_loss(_NextByte(0.0), num=8) - math.log(384)) < 1e-5  # type: ignore[arg-type]
    assert repeat_loss(_NextByte(50.0), num=8) < 1e-6  # type: ignore[arg-type]
    docs = [code_document(random.Random(s)) for s in range(200)]
    for doc in docs:  # both forms say the same codes twice
        first, second = re.findall(r"(?:Code: |key\[)(.*?)(?:\. Repeat: |\] => The key is )(.*)\.$", doc)[0]
        assert first == second, doc
