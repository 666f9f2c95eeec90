"""The front door's text processor (`server.engine.processor`): what it refuses, exactly, and why."""

import pytest
import torch

from prefix_store.entry import PrefixEntry, PrefixMeta
from prefix_store.errors import InvalidPrefix
from server.engine.errors import ContextTooLong, InvalidInput
from server.engine.model_loader import ModelOptions, load_model
from server.engine.processor import Processor
from server.engine.request import SamplingParams
from tests.tiny_models import VOCAB, save_tiny_model

MAX_LEN = 32


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory) -> Processor:
    path = save_tiny_model("gpt2", tmp_path_factory.mktemp("m") / "model")
    loaded = load_model(ModelOptions(str(path), "cpu", "float32", tmp_path_factory.mktemp("data")))
    return Processor(loaded, MAX_LEN)


def _prefix(prefix_len: int) -> PrefixEntry:
    meta = PrefixMeta("t:a", 1, prefix_len, 0, "float32", "fp", "now")
    return PrefixEntry(meta, torch.zeros(2, 2, 4, prefix_len, 8))


def test_a_prompt_that_fits_exactly_passes(processor: Processor) -> None:
    processor.validate(_prefix(4), [1] * 20, SamplingParams(max_new_tokens=MAX_LEN - 24))


@pytest.mark.parametrize(
    ("prompt", "max_new_tokens", "error", "message"),
    [
        ([], 1, InvalidInput, "the prompt is empty"),
        ([1, VOCAB, -1], 1, InvalidInput, rf"token ids must be in \[0, {VOCAB}\): got \[{VOCAB}, -1\]"),
        (
            [1] * 20,
            MAX_LEN - 23,
            ContextTooLong,
            rf"= {MAX_LEN + 1} exceeds the context of {MAX_LEN} positions",
        ),
    ],
)
def test_what_validate_refuses(
    processor: Processor, prompt: list[int], max_new_tokens: int, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        processor.validate(_prefix(4), prompt, SamplingParams(max_new_tokens=max_new_tokens))


def test_a_text_prefix_is_bounded_in_characters_before_tokenizing(processor: Processor) -> None:
    assert processor.encode_prefix_text("ab", max_prefix_len=4) == processor.encode("ab", False)
    too_long = "a" * (4 * processor.max_token_chars + 1)
    with pytest.raises(InvalidPrefix, match="more than 4 tokens hold"):
        processor.encode_prefix_text(too_long, max_prefix_len=4)


def test_token_text_decodes_one_token(processor: Processor) -> None:
    ids = processor.encode("hello", add_special_tokens=False)
    assert "".join(processor.token_text(t) for t in ids) == "hello"
