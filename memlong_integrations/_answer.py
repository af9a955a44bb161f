"""How every adapter turns the model's text pieces into an answer: stop strings and surrounding whitespace.

Contract of :func:`answer_pieces` (shared by the LlamaIndex and LangChain adapters, streaming or not):
    * A stop string ends the answer and is never part of it, not even in part: text that could still become
      the start of a stop string is held back until the next piece settles it (``" Halvora"`` is yielded,
      ``" Qu"`` waits; ``"ince"`` completes ``"Quince"`` and nothing more is yielded).
    * Small models often open an answer with a line break (``"Answer:"`` -> ``"\\nBartholomew Quince."``).
      Whitespace before the answer's first visible character never ends it: a stop match counts only if it
      reaches past that character (``stop=["\\n"]`` still ends ``"\\nQuince.\\nQuestion"`` after ``"Quince."``).
    * ``strip=True``: the answer has no leading or trailing whitespace (an answer of only whitespace is ``""``);
      trailing whitespace is held back until visible text follows it. Labels small models put before an answer
      (``"Answer:"``, ``"A:"``, ``"user:"``, ``"assistant:"``, ``"The answer is:"``) are dropped from its start.
    * When a stop string is found the underlying generator is closed, which ends decoding at once.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterator, Sequence
from typing import Any

from memlong.generation import stop_prefix_len
from memlong.prompts import PLAIN_STOP  # re-exported: a plain-prompt answer ends at the next question or paragraph

__all__ = ["KV_ANSWER_PREFIX", "PLAIN_STOP", "answer_pieces", "answer_text", "call_max_tokens", "call_option",
           "stop_strings"]

# Prefilled after "Answer:" when retrieved chunks are attended: with no prefill the 135M default model often ends
# at once (end of sequence) or answers "The answer is: <the question's subject>"; with it, it reads the chunks
# ("..., the keeper of the iron key is Tobias Wren."). Measured on the default model, examples/ and notebooks/.
KV_ANSWER_PREFIX = "According to the text,"


_LABELS = ("user", "assistant", "system", "answer", "a", "response", "the answer is")
_LABEL = re.compile(rf"(?:{'|'.join(_LABELS)})[ \t]*:", re.IGNORECASE)
_LABEL_ONLY = re.compile(rf"(?:{'|'.join(_LABELS)})\s*", re.IGNORECASE)


def _label_end(text: str, final: bool = False) -> int | None:
    """Where the answer's body starts after leading whitespace and labels (``"A: The answer is:"``); ``None``
    while the start could still turn into a label (or is only whitespace), unless ``final`` (the text is
    complete: what is not a whole label is the body)."""
    pos = 0
    while True:
        rest = text[pos:]
        body = rest.lstrip()
        pos += len(rest) - len(body)
        label = _LABEL.match(body)
        if label:
            pos += label.end()
            continue
        low = body.lower()
        if final:
            return pos
        if not body or _LABEL_ONLY.fullmatch(body) or any(f"{w}:".startswith(low) for w in _LABELS):
            return None
        return pos


def stop_strings(*sources: str | Sequence[str] | None) -> list[str]:
    """The stop strings of several sources (each ``None``, one string, or strings), in order, without repeats or
    empty strings: one string is one stop string, not its characters."""
    found: list[str] = []
    for source in sources:
        found += [] if source is None else [source] if isinstance(source, str) else list(source)
    return list(dict.fromkeys(s for s in found if s))


def _first_stop(text: str, stops: Sequence[str], visible: int) -> int:
    """Index where the first stop string that reaches past position ``visible`` starts, or -1."""
    cut = -1
    for stop in stops:
        start = text.find(stop)
        while start >= 0 and start + len(stop) <= visible:  # inside the leading whitespace: does not count
            start = text.find(stop, start + 1)
        if start >= 0 and (cut < 0 or start < cut):
            cut = start
    return cut


def answer_pieces(pieces: Iterator[str], stops: Sequence[str] = (), *, strip: bool = False) -> Iterator[str]:
    """The answer's text pieces from the model's ``pieces``: cut before the first stop string, never yielding
    a piece that may turn out to begin one (see module contract). Yields no empty pieces.

    Args:
        pieces: the text pieces of ``MemLong.generate(..., stream=True)`` (called without ``stop``).
        stops: strings that end the answer.
        strip: drop leading and trailing whitespace.

    The model's generator is closed when a stop string ends the answer (its stats then record the time so far and
    ``finish_reason="stop"``).
    """
    stops = [s for s in dict.fromkeys(stops) if s]
    text, sent = "", 0  # everything generated so far; how much of it was yielded (or dropped as leading space)
    body = None  # strip: where the answer's body starts (after whitespace and labels), once known
    try:
        for piece in pieces:
            text += piece
            if strip:
                if body is None:
                    body = _label_end(text)
                    if body is None:  # whitespace or a label forming: not an answer yet
                        continue
                    sent = body
                visible = body
            else:
                visible = len(text) - len(text.lstrip())
                if visible == len(text):  # only whitespace so far: not an answer yet
                    continue
            cut = _first_stop(text, stops, visible)
            if cut >= 0:
                stats = getattr(pieces, "stats", None)
                if stats is not None:  # the answer ended at a stop string, even on the last allowed token
                    stats.finish_reason = "stop"
                end = len(text[:cut].rstrip()) if strip else cut
                if end > sent:
                    yield text[sent:end]
                return
            safe = len(text) - stop_prefix_len(text, stops)
            if strip:
                safe = min(safe, len(text[:safe].rstrip()))
            if safe > sent:
                yield text[sent:safe]
                sent = safe
        if strip and body is None:  # ended while the start could still become a label ("The answer"): settle it
            sent = _label_end(text, final=True) or 0
            cut = _first_stop(text, stops, sent)
            rest = text[sent:cut if cut >= 0 else len(text)].strip()
        elif strip:
            rest = text[sent:].rstrip()
        else:
            rest = text[sent:]
        if rest:
            yield rest
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()


def answer_text(pieces: Iterator[str], stops: Sequence[str] = (), *, strip: bool = False) -> str:
    """The whole answer (see :func:`answer_pieces`)."""
    return "".join(answer_pieces(pieces, stops, strip=strip))


def call_option(kwargs: dict[str, Any], name: str, default: Any) -> Any:
    """A call's ``name`` option, or ``default`` when it is not given or ``None`` (as for ``max_tokens``)."""
    value = kwargs.get(name)
    return default if value is None else value


def call_max_tokens(kwargs: dict[str, Any], default: int) -> int:
    """A call's token budget: its ``max_tokens`` (or else ``max_new_tokens``), ``default`` when neither is given or
    is ``None``; ValueError unless a positive integer (numpy's too)."""
    limit = next((kwargs[k] for k in ("max_tokens", "max_new_tokens") if kwargs.get(k) is not None), default)
    if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit <= 0:
        raise ValueError(f"max_tokens must be a positive integer, got {limit!r}.")
    return int(limit)
