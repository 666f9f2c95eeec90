"""`make demo`'s data: held-out inputs carry values the tasks never train on, and the copy count
is exact."""

from __future__ import annotations

import pytest

from examples.table_to_text.demo import CITIES, HELD_OUT_CITIES, HELD_OUT_NAMES, Example, copied, datasets
from trainer.demo_corpus import NAMES


@pytest.mark.parametrize("open_values", [True, False])
def test_held_out_inputs_use_values_never_seen_in_training(open_values: bool) -> None:
    sets = datasets(120, 20, seed=1, open_values=open_values)
    assert set(sets) == {"demo:restaurant", "demo:weather", "demo:greeter"}
    for task, (train, held) in sets.items():
        assert (len(train), len(held)) == (120, 20), task
        assert not {e.input for e in train} & {e.input for e in held}, task
        for ex in train + held:
            assert all(v in ex.output for v in ex.values), ex  # the reference copies every value
    train_text = " ".join(e.input for e in sets["demo:greeter"][0] + sets["demo:weather"][0])
    assert not any(f"[{v}]" in train_text for v in HELD_OUT_NAMES + HELD_OUT_CITIES)
    assert {e.values[0] for e in sets["demo:weather"][1]} <= set(HELD_OUT_CITIES)
    assert len({e.values[0] for e in sets["demo:greeter"][1]}) >= 8


def test_copied_counts_verbatim_values() -> None:
    ex = Example("city[Durham], sky[rainy], high[14] => ", "", ("Durham", "rainy", "14"))
    assert copied(ex, "Today in Durham it will be rainy with a high of 14 degrees.") == 3
    assert copied(ex, "Today in London it will be rainy with a high of 11 degrees.") == 1


def test_open_values_train_on_made_up_names_and_towns() -> None:
    """Not the corpus's 32 venues and 7 cities: a prefix cannot fit them by recalling a few."""
    sets = datasets(120, 20, seed=1, open_values=True)
    names = {e.values[0] for e in sets["demo:greeter"][0]}
    towns = {e.values[0] for e in sets["demo:weather"][0]}
    assert len(names) >= 60 and len(towns) >= 60
    assert not names & set(NAMES) and not towns & set(CITIES)
