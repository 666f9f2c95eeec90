"""Exact tests for `server.engine.postprocess`: finishing, stop strings, held-back deltas."""

import random
from collections.abc import Callable

import pytest
import torch

from prefix_store.entry import PrefixEntry, PrefixMeta
from server.engine.postprocess import append_token, find_stop, safe_end
from server.engine.request import Request, SamplingParams, StepOutput

EOS = 0
NO_EOS: frozenset[int] = frozenset()
Decode = Callable[[list[int]], str]


def chars(ids: list[int]) -> str:
    """One character per id; the EOS id is a special token and decodes to nothing."""
    return "".join(chr(i) for i in ids if i != EOS)


def utf8(ids: list[int]) -> str:
    """One byte per id, like a byte-level tokenizer: a cut multibyte sequence shows as U+FFFD."""
    return bytes(ids).decode("utf-8", errors="replace")


def pieces(vocab: dict[int, str]) -> Decode:
    """Multi-character tokens."""
    return lambda ids: "".join(vocab[i] for i in ids)


def ids_of(text: str) -> list[int]:
    return [ord(c) for c in text]


def make_request(**params: object) -> Request:
    meta = PrefixMeta(
        task_id="task",
        version=1,
        prefix_len=1,
        num_bytes=4,
        dtype="float32",
        model_fingerprint="fp",
        created_at="2024-01-01T00:00:00Z",
    )
    prefix = PrefixEntry(meta=meta, kv=torch.zeros(1, 2, 1, 1, 1))
    return Request(prefix=prefix, prompt_ids=[1, 2, 3], params=SamplingParams(**params))  # type: ignore[arg-type]


def run(
    request: Request, tokens: list[int], decode: Decode = chars, eos_ids: frozenset[int] = NO_EOS
) -> list[StepOutput]:
    """Feed tokens until the request finishes; check the deltas add up to the final text."""
    outputs = []
    emitted = ""
    for token in tokens:
        assert not request.is_finished
        out = append_token(request, token, decode, eos_ids)
        outputs.append(out)
        emitted += out.text_delta
        assert request.text.startswith(emitted)  # never emits anything it takes back
        assert request.num_sent_chars == len(emitted)
        if request.is_finished:
            break
    if request.is_finished:
        assert emitted == request.text
    return outputs


def deltas(outputs: list[StepOutput]) -> list[str]:
    return [o.text_delta for o in outputs]


def reasons(outputs: list[StepOutput]) -> list[str | None]:
    return [o.finish_reason for o in outputs]


# ---- find_stop / safe_end -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("hello world", (), -1),
        ("hello world", ("xyz",), -1),
        ("hello world", ("wor",), 6),
        ("hello world", ("o",), 4),
        ("hello world", ("he",), 0),
        ("hello world", ("world", "lo"), 3),
        ("hello world", ("lo", "world"), 3),
        ("hello world", ("",), -1),
        ("hello world", ("", "d"), 10),
        ("hello world", ("hello world!",), -1),
        ("", ("a",), -1),
    ],
)
def test_find_stop(text: str, stops: tuple[str, ...], expected: int) -> None:
    assert find_stop(text, stops) == expected


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("abc", (), 3),
        ("abc", ("x",), 3),
        ("abcdef", ("xyz",), 4),
        ("abcdef", ("xyz", "ab"), 4),
        ("abcdef", ("ab", "wxyz"), 3),
        ("ab", ("wxyz",), 0),
        ("", ("xyz",), 0),
        ("", (), 0),
        ("abc", ("",), 3),
        ("ab\ufffd", (), 2),
        ("ab\ufffd\ufffd", (), 2),
        ("\ufffd", (), 0),
        ("a\ufffdb", (), 3),
        ("a\ufffd", ("xyz",), 0),
    ],
)
def test_safe_end(text: str, stops: tuple[str, ...], expected: int) -> None:
    assert safe_end(text, stops) == expected


# ---- finishing ------------------------------------------------------------------------------


def test_length_finish_at_max_new_tokens() -> None:
    request = make_request(max_new_tokens=3)
    outputs = run(request, ids_of("abcdef"))
    assert len(outputs) == 3
    assert reasons(outputs) == [None, None, "length"]
    assert deltas(outputs) == ["a", "b", "c"]
    assert [o.token_ids for o in outputs] == [[97], [98], [99]]
    assert {o.request_id for o in outputs} == {request.request_id}
    assert request.output_ids == [97, 98, 99]
    assert request.text == "abc"
    assert request.finish_reason == "length"


def test_max_new_tokens_one() -> None:
    request = make_request(max_new_tokens=1)
    outputs = run(request, ids_of("xyz"))
    assert reasons(outputs) == ["length"]
    assert deltas(outputs) == ["x"]


def test_eos_finish() -> None:
    request = make_request(max_new_tokens=10)
    outputs = run(request, [*ids_of("ab"), EOS, *ids_of("cd")], eos_ids=frozenset({EOS}))
    assert reasons(outputs) == [None, None, "eos"]
    assert deltas(outputs) == ["a", "b", ""]
    assert outputs[-1].token_ids == [EOS]
    assert request.output_ids == [97, 98, EOS]
    assert request.text == "ab"


def test_eos_among_several_eos_ids() -> None:
    request = make_request(max_new_tokens=10)
    outputs = run(request, ids_of("abc"), eos_ids=frozenset({EOS, ord("b")}))
    assert reasons(outputs) == [None, "eos"]
    assert request.text == "ab"  # this fake decoder keeps "b": eos finishes, it does not truncate


def test_ignore_eos() -> None:
    request = make_request(max_new_tokens=4, ignore_eos=True)
    outputs = run(request, [97, EOS, 98, EOS, 99], eos_ids=frozenset({EOS}))
    assert reasons(outputs) == [None, None, None, "length"]
    assert request.output_ids == [97, EOS, 98, EOS]
    assert request.text == "ab"


def test_eos_on_last_allowed_token_is_eos() -> None:
    request = make_request(max_new_tokens=2)
    outputs = run(request, [97, EOS], eos_ids=frozenset({EOS}))
    assert reasons(outputs) == [None, "eos"]


def test_first_token_time_set_once() -> None:
    request = make_request(max_new_tokens=5)
    assert request.first_token_time is None
    append_token(request, 97, chars, NO_EOS)
    first = request.first_token_time
    assert isinstance(first, float)
    append_token(request, 98, chars, NO_EOS)
    assert request.first_token_time == first


# ---- stop strings -----------------------------------------------------------------------------


def test_single_char_stop() -> None:
    request = make_request(max_new_tokens=10, stop=("c",))
    outputs = run(request, ids_of("abcd"))
    assert reasons(outputs) == [None, None, "stop"]
    assert deltas(outputs) == ["a", "b", ""]
    assert request.text == "ab"
    assert request.output_ids == ids_of("abc")


def test_stop_spanning_several_tokens() -> None:
    request = make_request(max_new_tokens=10, stop=("END",))
    outputs = run(request, ids_of("xEND") + ids_of("zz"))
    assert reasons(outputs) == [None, None, None, "stop"]
    assert deltas(outputs) == ["", "", "x", ""]
    assert request.text == "x"


def test_stop_spanning_multichar_tokens() -> None:
    decode = pieces({1: "Hello", 2: " wor", 3: "ld", 4: " ST", 5: "OP", 6: "!"})
    request = make_request(max_new_tokens=10, stop=("STOP",))
    outputs = run(request, [1, 2, 3, 4, 5, 6], decode)
    # holdback is len("STOP") - 1 = 3 characters
    assert deltas(outputs) == ["He", "llo ", "wo", "rld", " "]
    assert reasons(outputs) == [None, None, None, None, "stop"]
    assert request.text == "Hello world "


def test_stop_inside_one_token_drops_the_rest_of_it() -> None:
    decode = pieces({1: "ab", 2: "c<|end|>trailing", 3: "zz"})
    request = make_request(max_new_tokens=10, stop=("<|end|>",))
    outputs = run(request, [1, 2, 3], decode)
    assert reasons(outputs) == [None, "stop"]
    assert deltas(outputs) == ["", "abc"]
    assert request.text == "abc"


def test_stop_at_very_start() -> None:
    request = make_request(max_new_tokens=10, stop=("ab",))
    outputs = run(request, ids_of("abc"))
    assert reasons(outputs) == [None, "stop"]
    assert deltas(outputs) == ["", ""]
    assert request.text == ""


def test_earliest_of_several_stops_wins() -> None:
    decode = pieces({1: "one two three"})
    request = make_request(max_new_tokens=10, stop=("three", "two", "zzz"))
    outputs = run(request, [1], decode)
    assert reasons(outputs) == ["stop"]
    assert request.text == "one "
    assert deltas(outputs) == ["one "]


def test_stop_wins_over_eos_and_length() -> None:
    request = make_request(max_new_tokens=2, stop=("b",))
    outputs = run(request, ids_of("ab"), eos_ids=frozenset({ord("b")}))
    assert reasons(outputs) == [None, "stop"]
    assert request.text == "a"


def test_partial_stop_prefix_held_back_then_released() -> None:
    request = make_request(max_new_tokens=6, stop=("END",))
    outputs = run(request, ids_of("aENxyz"))
    # "EN" could start "END": it is held back until more text shows it is not a stop string
    assert deltas(outputs) == ["", "", "a", "E", "N", "xyz"]  # the last one finishes: all of it
    assert reasons(outputs) == [None] * 5 + ["length"]
    assert request.text == "aENxyz"


def test_held_back_text_released_when_finished_by_length() -> None:
    request = make_request(max_new_tokens=3, stop=("ENDX",))
    outputs = run(request, ids_of("aEN"))
    assert deltas(outputs) == ["", "", "aEN"]
    assert reasons(outputs) == [None, None, "length"]


def test_held_back_text_released_when_finished_by_eos() -> None:
    request = make_request(max_new_tokens=10, stop=("END",))
    outputs = run(request, [*ids_of("abEN"), EOS], eos_ids=frozenset({EOS}))
    assert deltas(outputs) == ["", "", "a", "b", "EN"]
    assert reasons(outputs)[-1] == "eos"
    assert request.text == "abEN"


def test_repeated_partial_stops_never_leak() -> None:
    request = make_request(max_new_tokens=20, stop=("ENDS",))
    outputs = run(request, ids_of("ENENDENDENDS!"))
    assert reasons(outputs)[-1] == "stop"
    assert request.text == "ENENDEND"
    assert deltas(outputs) == ["", "", "", "E", "N", "E", "N", "D", "E", "N", "D", ""]


# ---- incomplete UTF-8 ------------------------------------------------------------------------


def test_trailing_replacement_char_held_back() -> None:
    euro = list("€".encode())  # [0xE2, 0x82, 0xAC]
    request = make_request(max_new_tokens=10)
    outputs = run(request, [ord("a"), *euro, ord("b")], utf8)
    assert deltas(outputs) == ["a", "", "", "€", "b"]
    assert request.text == "a€b"


def test_four_byte_char_held_back_until_complete() -> None:
    smile = list("😀".encode())
    request = make_request(max_new_tokens=5)
    outputs = run(request, [*smile, ord("!")], utf8)
    assert deltas(outputs) == ["", "", "", "😀", "!"]
    assert reasons(outputs)[-1] == "length"
    assert request.text == "😀!"


def test_incomplete_char_released_when_finished() -> None:
    request = make_request(max_new_tokens=2)
    outputs = run(request, [ord("a"), 0xE2], utf8)
    assert deltas(outputs) == ["a", "\ufffd"]
    assert request.text == "a\ufffd"


def test_invalid_byte_in_the_middle_is_not_held() -> None:
    request = make_request(max_new_tokens=10)
    outputs = run(request, [ord("a"), 0xFF, ord("b")], utf8)
    assert deltas(outputs) == ["a", "", "\ufffdb"]
    assert request.text == "a\ufffdb"


def test_multibyte_stop_string_over_byte_tokens() -> None:
    request = make_request(max_new_tokens=10, stop=("€",))
    outputs = run(request, [ord("x"), *"€".encode(), ord("y")], utf8)
    assert deltas(outputs) == ["x", "", "", ""]
    assert reasons(outputs) == [None, None, None, "stop"]
    assert request.text == "x"


def test_stop_and_incomplete_char_together() -> None:
    request = make_request(max_new_tokens=20, stop=("ab",))
    outputs = run(request, [ord("x"), *"é".encode(), ord("a"), ord("b")], utf8)
    assert reasons(outputs) == [None, None, None, None, "stop"]
    assert all("\ufffd" not in d for d in deltas(outputs))  # the half "é" is never shown
    assert "".join(deltas(outputs[:4])) == "xé"  # "a" (start of "ab") is held back
    assert deltas(outputs)[4] == ""
    assert request.text == "xé"


def test_safe_end_holds_back_stop_prefix_behind_incomplete_char() -> None:
    """BUG: the holdback is measured from the end of the text including trailing U+FFFD.

    `safe_end` returns `min(end, len(text) - holdback)`; the trailing U+FFFD then counts as the
    held-back characters, so the real text before it ("a", which may start the stop "a€") is shown.
    """
    assert safe_end("xa\ufffd", ("a€",)) == 1
    assert safe_end("xa\ufffd\ufffd", ("a€",)) == 1
    assert safe_end("abcd\ufffd", ("xyz",)) == 2
    assert safe_end("abcdef\ufffd", ("xy",)) == 5


def test_multibyte_stop_prefix_not_leaked_by_incomplete_char() -> None:
    """BUG (same cause): "a" of the stop "a€" is emitted while "€" is still arriving byte by byte."""
    request = make_request(max_new_tokens=10, stop=("a€",))
    tokens = [ord("x"), ord("a"), *"€".encode()]
    outputs = [append_token(request, t, utf8, NO_EOS) for t in tokens]
    assert reasons(outputs) == [None, None, None, None, "stop"]
    assert request.text == "x"
    assert deltas(outputs) == ["", "x", "", "", ""]
    assert "".join(deltas(outputs)) == request.text


# ---- property: deltas always add up --------------------------------------------------------


def test_random_streams_deltas_add_up_and_never_show_stops() -> None:
    rng = random.Random(7)
    alphabet = "abcE ND€é"
    for _ in range(400):
        stops = tuple(rng.choice(["END", "ab", "N", "€a", "cc c", "é"]) for _ in range(rng.randint(0, 2)))
        max_new = rng.randint(1, 25)
        text = "".join(rng.choice(alphabet) for _ in range(30))
        tokens = list(text.encode())  # byte tokens: multibyte chars arrive in pieces
        eos_ids = frozenset({ord("c")}) if rng.random() < 0.3 else NO_EOS
        request = make_request(max_new_tokens=max_new, stop=stops, ignore_eos=rng.random() < 0.5)
        outputs = run(request, tokens, utf8, eos_ids)
        assert request.is_finished
        emitted = "".join(deltas(outputs))
        assert emitted == request.text
        assert find_stop(emitted, stops) == -1
        assert [o.finish_reason for o in outputs[:-1]] == [None] * (len(outputs) - 1)
        full = utf8(request.output_ids)
        stop_at = find_stop(full, stops)
        if request.finish_reason == "stop":
            assert request.text == full[:stop_at]
        else:
            assert stop_at == -1
            assert request.text == full
        if request.finish_reason == "length":
            assert len(request.output_ids) == max_new


# ---- incremental detokenization ----------------------------------------------------------------


def test_each_token_decodes_a_small_window_not_the_whole_output() -> None:
    """O(new tokens): with 3,000 tokens (multibyte chars among them) no decode call sees more than
    a few ids; the text equals one decode of everything."""
    sizes: list[int] = []

    def counting(ids: list[int]) -> str:
        sizes.append(len(ids))
        return utf8(ids)

    tokens = list(("héllo wörld 😀 " * 250).encode())[:3000]
    request = make_request(max_new_tokens=len(tokens), stop=("never",))
    run(request, tokens, counting)
    assert request.finish_reason == "length"
    assert request.text == utf8(tokens)
    assert max(sizes) <= 8


def test_incremental_text_equals_a_real_tokenizers_full_decode() -> None:
    from transformers import ByT5Tokenizer

    tokenizer = ByT5Tokenizer()

    def decode(ids: list[int]) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=True))

    rng = random.Random(11)
    for _ in range(50):
        ids = [rng.choice([1, 2, *range(3, 259)]) for _ in range(rng.randint(1, 60))]  # specials, bytes
        request = make_request(max_new_tokens=len(ids))
        run(request, ids, decode)
        assert request.text == decode(ids)


def test_sentencepiece_byte_fallback_runs_stream_as_decode_does(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A run of `<0xNN>` tokens that is not valid UTF-8 decodes to one U+FFFD per byte, ASCII
    bytes of the run included: text after a byte token is held until the run closes, so the
    streamed deltas join to exactly decode(all ids), for random mixes of bytes and pieces."""
    from server.engine.model_loader import byte_fallback_ids
    from tests.tiny_families import FAMILIES, save_tokenizer

    tokenizer = save_tokenizer(FAMILIES["llama-2"], tmp_path)
    byte_ids = byte_fallback_ids(tokenizer)
    assert len(byte_ids) == 256

    def decode(ids: list[int]) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=True))

    pieces_ = [i for i in range(len(tokenizer)) if i not in byte_ids and i > 2]
    rng = random.Random(3)
    for _ in range(300):
        ids = [rng.choice(sorted(byte_ids)) if rng.random() < 0.6 else rng.choice(pieces_) for _ in range(8)]
        request = make_request(max_new_tokens=len(ids), ignore_eos=True)
        deltas = [append_token(request, i, decode, NO_EOS, byte_ids).text_delta for i in ids]
        assert "".join(deltas) == decode(ids), ids
