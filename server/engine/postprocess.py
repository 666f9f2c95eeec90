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


def append_token(
    request: Request, token_id: int, decode: Callable[[list[int]], str], eos_ids: frozenset[int]
) -> StepOutput:
    """Record one sampled id on `request` and say what to tell its caller."""
    params = request.params
    if request.first_token_time is None:
        request.first_token_time = time.monotonic()
    request.output_ids.append(token_id)
    text = decode(request.output_ids)
    stop_at = find_stop(text, params.stop)
    if stop_at >= 0:
        text = text[:stop_at]
        request.finish_reason = "stop"
    elif token_id in eos_ids and not params.ignore_eos:
        request.finish_reason = "eos"
    elif len(request.output_ids) >= params.max_new_tokens:
        request.finish_reason = "length"
    request.text = text
    end = len(text) if request.is_finished else safe_end(text, params.stop)
    delta = text[request.num_sent_chars : end] if end > request.num_sent_chars else ""
    request.num_sent_chars = max(request.num_sent_chars, end)
    return StepOutput(request.request_id, [token_id], delta, request.finish_reason)
