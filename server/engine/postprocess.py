"""After sampling: append the id, detokenize, apply EOS / stop strings / length, emit a delta."""

import time
from collections.abc import Callable

from server.engine.request import Request, StepOutput

_INCOMPLETE = "\ufffd"  # what a decoder shows for a UTF-8 sequence cut in the middle


def find_stop(text: str, stops: tuple[str, ...]) -> int:
    """Index of the earliest stop string in `text`, or -1."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


def safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of an unfinished row's text can be shown without revealing a partial stop string."""
    end = len(text)
    while end > 0 and text[end - 1] == _INCOMPLETE:
        end -= 1
    holdback = max((len(s) - 1 for s in stops if s), default=0)
    return max(0, end - holdback)  # measured from `end`: placeholders must not eat the holdback


def decode_tail(
    request: Request, decode: Callable[[list[int]], str], byte_ids: frozenset[int] = frozenset()
) -> tuple[str, bool]:
    """The text of the output ids after `read_offset`, decoding only a small window of trailing
    ids (O(new tokens), as vLLM's detokenize_incrementally), and whether it is complete: a tail
    ending in U+FFFD may be a UTF-8 sequence cut in the middle, and one ending in a byte-fallback
    token may yet turn into U+FFFDs (an invalid run decodes to one per byte), so neither is
    committed yet."""
    ids = request.output_ids
    prefix_text = decode(ids[request.prefix_offset : request.read_offset])
    full = decode(ids[request.prefix_offset :])
    if len(full) <= len(prefix_text):
        return "", False
    tail = full[len(prefix_text) :]
    return tail, not tail.endswith(_INCOMPLETE) and ids[-1] not in byte_ids


def append_token(
    request: Request,
    token_id: int,
    decode: Callable[[list[int]], str],
    eos_ids: frozenset[int],
    byte_ids: frozenset[int] = frozenset(),
) -> StepOutput:
    """Record one sampled id on `request` and say what to tell its caller."""
    params = request.params
    if request.first_token_time is None:
        request.first_token_time = time.monotonic()
    request.output_ids.append(token_id)
    committed = request.text[: len(request.text) - request.num_pending_chars]
    tail, is_complete = decode_tail(request, decode, byte_ids)
    text = committed + tail  # == decode(output_ids), without decoding them all
    # no stop string was in the committed text: one can only end in the tail
    longest = max((len(s) for s in params.stop if s), default=0)
    search_from = max(0, len(committed) - longest + 1)
    stop_at = find_stop(text[search_from:], params.stop) if longest else -1
    if stop_at >= 0:
        text = text[: search_from + stop_at]
        request.finish_reason = "stop"
    elif token_id in eos_ids and not params.ignore_eos:
        request.finish_reason = "eos"
    elif len(request.output_ids) >= params.max_new_tokens:
        request.finish_reason = "length"
    if is_complete:
        request.prefix_offset, request.read_offset = request.read_offset, len(request.output_ids)
    request.num_pending_chars = 0 if is_complete else len(tail)
    request.text = text
    held = request.num_pending_chars if token_id in byte_ids else 0  # may yet become U+FFFDs
    end = len(text) if request.is_finished else safe_end(text[: len(text) - held], params.stop)
    delta = text[request.num_sent_chars : end] if end > request.num_sent_chars else ""
    request.num_sent_chars = max(request.num_sent_chars, end)
    return StepOutput(request.request_id, [token_id], delta, request.finish_reason)
