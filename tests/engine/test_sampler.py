"""Exact tests for `server.engine.sampler`: greedy argmax, filtering, seeded sampling."""

import math

import pytest
import torch

from server.engine.request import SamplingParams
from server.engine.sampler import filter_probs, make_generator, sample

CPU = torch.device("cpu")
PROBS = [0.5, 0.3, 0.15, 0.05]


def known_logits(probs: list[float] = PROBS) -> torch.Tensor:
    """Logits whose softmax is exactly-ish `probs` (log-probabilities)."""
    return torch.tensor([math.log(p) for p in probs], dtype=torch.float32)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampler's filtered distribution of one row `[vocab]`."""
    return filter_probs(logits[None], [params])[0]


def generators(params: list[SamplingParams]) -> list[torch.Generator | None]:
    return [make_generator(p, CPU) for p in params]


# ---- make_generator -----------------------------------------------------------------------


def test_greedy_gets_no_generator() -> None:
    assert make_generator(SamplingParams(temperature=0.0, seed=3), CPU) is None


def test_seeded_generator_state_is_the_seed() -> None:
    generator = make_generator(SamplingParams(temperature=1.0, seed=1234), CPU)
    assert isinstance(generator, torch.Generator)
    assert generator.initial_seed() == 1234


# ---- greedy -------------------------------------------------------------------------------


def test_greedy_rows_pick_argmax() -> None:
    logits = torch.tensor(
        [[0.1, 3.0, -1.0, 2.9], [5.0, 4.0, 3.0, 2.0], [-3.0, -2.0, -1.0, -0.5]], dtype=torch.float32
    )
    params = [SamplingParams()] * 3
    assert sample(logits, params, [None, None, None]) == [1, 0, 3]


def test_greedy_rows_ignore_generators() -> None:
    logits = torch.tensor([[0.0, 1.0, 0.9], [2.0, 0.0, 1.99]], dtype=torch.float32)
    params = [SamplingParams(top_k=2, top_p=0.5, seed=7)] * 2  # temperature 0: still greedy
    gens: list[torch.Generator | None] = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    for _ in range(20):
        assert sample(logits, params, gens) == [1, 0]


def test_greedy_rows_do_not_consume_generator_state() -> None:
    gen = torch.Generator().manual_seed(5)
    before = gen.get_state()
    sample(torch.tensor([[0.0, 1.0]]), [SamplingParams()], [gen])
    assert torch.equal(gen.get_state(), before)


def test_sample_returns_python_ints() -> None:
    out = sample(torch.tensor([[0.0, 1.0]]), [SamplingParams()], [None])
    assert out == [1]
    assert type(out[0]) is int


def test_sample_rejects_params_and_generators_of_different_lengths() -> None:
    with pytest.raises(ValueError):
        sample(torch.zeros(2, 3), [SamplingParams(), SamplingParams()], [None])


# ---- filter_logits --------------------------------------------------------------------------


def test_no_filtering_is_softmax() -> None:
    probs = filter_logits(known_logits(), SamplingParams(temperature=1.0))
    torch.testing.assert_close(probs, torch.tensor(PROBS), rtol=0, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.25, 0.7, 1.0, 1.5, 4.0])
def test_temperature_is_softmax_of_scaled_logits(temperature: float) -> None:
    logits = torch.tensor([1.0, -0.5, 2.5, 0.0, 3.0], dtype=torch.float32)
    probs = filter_logits(logits, SamplingParams(temperature=temperature))
    torch.testing.assert_close(probs, torch.softmax(logits / temperature, dim=-1), rtol=0, atol=1e-7)


def test_temperature_sharpens_and_flattens() -> None:
    logits = known_logits()
    cold = filter_logits(logits, SamplingParams(temperature=0.5))
    hot = filter_logits(logits, SamplingParams(temperature=2.0))
    # T=0.5 squares the probabilities (then renormalises); T=2 takes square roots
    squared = torch.tensor([p**2 for p in PROBS])
    rooted = torch.tensor([p**0.5 for p in PROBS])
    torch.testing.assert_close(cold, squared / squared.sum(), rtol=0, atol=1e-6)
    torch.testing.assert_close(hot, rooted / rooted.sum(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_top_k_keeps_exactly_k(k: int) -> None:
    logits = torch.tensor([0.3, 2.0, -1.0, 1.5, 0.9, -0.2], dtype=torch.float32)
    probs = filter_logits(logits, SamplingParams(temperature=1.0, top_k=k))
    top = torch.topk(logits, k).indices.tolist()
    assert sorted(torch.nonzero(probs).flatten().tolist()) == sorted(top)
    rest = [i for i in range(6) if i not in top]
    assert probs[rest].tolist() == [0.0] * len(rest)
    expected = torch.softmax(logits[top], dim=-1)
    torch.testing.assert_close(probs[top], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [0, 6, 100])
def test_top_k_zero_or_vocab_or_more_keeps_all(k: int) -> None:
    logits = torch.tensor([0.3, 2.0, -1.0, 1.5, 0.9, -0.2], dtype=torch.float32)
    probs = filter_logits(logits, SamplingParams(temperature=1.0, top_k=k))
    torch.testing.assert_close(probs, torch.softmax(logits, dim=-1), rtol=0, atol=1e-7)


def test_top_k_applies_after_temperature() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0], dtype=torch.float32)
    probs = filter_logits(logits, SamplingParams(temperature=2.0, top_k=2))
    assert probs[[0, 3]].tolist() == [0.0, 0.0]
    expected = torch.softmax(torch.tensor([3.0, 2.0]) / 2.0, dim=-1)
    torch.testing.assert_close(probs[[1, 2]], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        (1e-9, [0]),
        (0.1, [0]),
        (0.45, [0]),
        (0.55, [0, 1]),
        (0.75, [0, 1]),
        (0.85, [0, 1, 2]),
        (0.94, [0, 1, 2]),
        (0.96, [0, 1, 2, 3]),
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_top_p_keeps_smallest_set_reaching_p(top_p: float, kept: list[int]) -> None:
    probs = filter_logits(known_logits(), SamplingParams(temperature=1.0, top_p=top_p))
    assert torch.nonzero(probs).flatten().tolist() == kept
    dropped = [i for i in range(4) if i not in kept]
    assert probs[dropped].tolist() == [0.0] * len(dropped)
    mass = sum(PROBS[i] for i in kept)
    expected = torch.tensor([PROBS[i] / mass for i in kept])
    torch.testing.assert_close(probs[kept], expected, rtol=0, atol=1e-6)
    assert abs(float(probs.sum()) - 1.0) < 1e-6


def test_top_p_works_on_unsorted_vocab() -> None:
    order = [2, 0, 3, 1]  # token j has probability PROBS[order[j]]
    shuffled = [PROBS[i] for i in order]  # [0.15, 0.5, 0.05, 0.3]
    probs = filter_logits(known_logits(shuffled), SamplingParams(temperature=1.0, top_p=0.75))
    assert probs[0].item() == 0.0 and probs[2].item() == 0.0
    torch.testing.assert_close(probs[[1, 3]], torch.tensor([0.625, 0.375]), rtol=0, atol=1e-6)


def test_top_p_tiny_keeps_top_token_only() -> None:
    logits = torch.tensor([0.0, 0.01, -0.01, 0.005], dtype=torch.float32)  # nearly flat
    probs = filter_logits(logits, SamplingParams(temperature=1.0, top_p=1e-6))
    assert probs.tolist() == [0.0, 1.0, 0.0, 0.0]


def test_top_k_then_top_p() -> None:
    # top_k=3 -> [0.5, 0.3, 0.15] renormalised by 0.95; then top_p=0.8 needs 0.5/0.95 + 0.3/0.95 = 0.842
    probs = filter_logits(known_logits(), SamplingParams(temperature=1.0, top_k=3, top_p=0.8))
    assert probs[[2, 3]].tolist() == [0.0, 0.0]
    torch.testing.assert_close(probs[[0, 1]], torch.tensor([0.625, 0.375]), rtol=0, atol=1e-6)


def test_filtered_tokens_are_never_sampled() -> None:
    logits = known_logits().unsqueeze(0)
    params = [SamplingParams(temperature=1.0, top_k=2, seed=11)]
    gens = generators(params)
    seen = {sample(logits, params, gens)[0] for _ in range(300)}
    assert seen == {0, 1}


# ---- seeded sampling ------------------------------------------------------------------------


def draw(logits: torch.Tensor, params: SamplingParams, n: int) -> list[int]:
    gens = generators([params])
    return [sample(logits.unsqueeze(0), [params], gens)[0] for _ in range(n)]


def test_same_seed_same_sequence() -> None:
    logits = torch.zeros(50)
    params = SamplingParams(temperature=1.0, seed=42)
    first = draw(logits, params, 50)
    assert draw(logits, params, 50) == first
    assert len(set(first)) > 10  # a real sequence, not a constant


def test_different_seeds_differ() -> None:
    logits = torch.zeros(50)
    a = draw(logits, SamplingParams(temperature=1.0, seed=1), 50)
    b = draw(logits, SamplingParams(temperature=1.0, seed=2), 50)
    assert a != b


def test_seeded_row_is_independent_of_batch() -> None:
    vocab = 32
    torch.manual_seed(0)
    target_logits = torch.randn(vocab)
    target = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=2024)
    other_logits = torch.randn(4, vocab)
    others = [
        SamplingParams(),  # greedy
        SamplingParams(temperature=1.0, seed=7),
        SamplingParams(temperature=1.3, top_k=5, seed=2024),  # same seed, other settings
        SamplingParams(temperature=0.5, top_p=0.5, seed=99),
    ]
    alone = draw(target_logits, target, 40)
    t = -1  # the seeded row under test; other numbers index `others`
    layouts: list[list[int]] = [
        [0, t],
        [t, 1],
        [0, 1, t, 2, 3],
        [3, 2, 1, 0, t],
        [t, t],  # two rows with the same seed and logits sample the same ids
    ]
    for layout in layouts:
        params = [target if x == t else others[x] for x in layout]
        rows = [target_logits if x == t else other_logits[x] for x in layout]
        logits = torch.stack(rows)
        gens = generators(params)
        got: list[list[int]] = [[] for _ in layout]
        for _ in range(40):
            for i, token in enumerate(sample(logits, params, gens)):
                got[i].append(token)
        for i, x in enumerate(layout):
            if x == t:
                assert got[i] == alone, layout
            if x == 0:
                assert got[i] == [int(other_logits[0].argmax())] * 40


def test_mixed_batch_greedy_and_top_k_one() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 1.0, 4.0], [9.0, 0.0, 0.0]], dtype=torch.float32)
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=1, seed=3), SamplingParams()]
    assert sample(logits, params, generators(params)) == [1, 2, 0]  # top_k=1 is deterministic


@pytest.mark.parametrize(("top_p", "kept"), [(0.5, [0]), (0.75, [0, 1]), (0.875, [0, 1, 2])])
def test_top_p_mass_exactly_reaching_p_stops_there(top_p: float, kept: list[int]) -> None:
    dyadic = [0.5, 0.25, 0.125, 0.125]  # exact in float32, so the boundary is exact
    probs = filter_logits(known_logits(dyadic), SamplingParams(temperature=1.0, top_p=top_p))
    assert torch.nonzero(probs).flatten().tolist() == kept
    expected = [dyadic[i] / top_p if i in kept else 0.0 for i in range(4)]
    torch.testing.assert_close(probs, torch.tensor(expected), rtol=0, atol=1e-6)


def test_extreme_but_valid_values_sample_the_top_token_instead_of_failing() -> None:
    """Found by fuzzing: a top_p that rounds to 0 in float32, or a temperature so small that
    logits / T overflow, used to raise inside the batch (failing every row). Both are the
    greedy limit: the top token."""
    logits = torch.tensor([[0.5, 3.0, 1.0, -2.0], [0.5, 3.0, 1.0, -2.0]])
    params = [SamplingParams(temperature=1.0, top_p=1e-50, seed=1), SamplingParams(temperature=1e-40, seed=2)]
    assert sample(logits, params, [make_generator(p, torch.device("cpu")) for p in params]) == [1, 1]


def test_seeds_outside_torch_range_still_reproduce() -> None:
    big = SamplingParams(temperature=1.0, seed=2**70 + 5)
    first = make_generator(big, torch.device("cpu"))
    again = make_generator(big, torch.device("cpu"))
    assert first is not None and again is not None
    assert torch.equal(torch.rand(4, generator=first), torch.rand(4, generator=again))
    assert make_generator(SamplingParams(temperature=1.0, seed=-(2**70)), torch.device("cpu")) is not None
