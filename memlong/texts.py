"""The text of a chunk of token ids: what a document's chunks are retrieved, embedded, searched and pasted by.

Contract: joined in order, the chunk texts of a document give the document back (a character whose bytes a chunk
boundary splits belongs to the chunk that completes it); :mod:`memlong.streaming` keeps the last :data:`CONTEXT`
tokens of a stream to place a step's first characters.

Example:
    >>> chunk_texts(tokenizer, [], tokenizer.encode("北京"), [(0, 1), (1, 4)])   # a boundary inside 北 (SmolLM2)
    ['', '北京']
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Sequence
from typing import Any

__all__ = ["CONTEXT", "chunk_texts"]

CONTEXT = 8  # tokens kept before a chunk to find where its first characters began (UTF-8: up to 4 bytes each)


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): the character each byte is written as in a token, inverted."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in shown]
    return {**{chr(b): b for b in shown}, **{chr(256 + i): b for i, b in enumerate(rest)}}


_BYTE_OF = _byte_alphabet()


def _char_start(data: bytes, at: int) -> int:
    """The start of the character byte ``at`` of ``data`` belongs to (``at == len(data)``: the end, or the start of
    an incomplete last character, which the next tokens complete)."""
    if at < len(data):
        back = 0
        while back < 3 and at - back > 0 and data[at - back] & 0xC0 == 0x80:  # a continuation byte
            back += 1
        return at - back
    for back in range(1, min(4, len(data)) + 1):
        lead = data[-back]
        if lead & 0xC0 != 0x80:
            size = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
            return len(data) - back if size > back else len(data)
    return len(data)


def chunk_texts(tokenizer: Any, before: Sequence[int], tokens: Sequence[int], bounds: list[tuple[int, int]]) -> list[str]:
    """The text of each chunk ``tokens[s:e]`` for ``(s, e)`` in ``bounds``, after the tokens ``before`` them: joined
    in order, the chunks of a document give its text (whitespace-only chunks aside, which are not stored). A
    character whose bytes are split between two chunks' tokens (CJK, emoji, Devanagari under a byte-level tokenizer)
    belongs to the chunk that completes it; decoding each chunk alone turned it into U+FFFD in both and lost it.
    Byte-level tokenizers are read byte by byte (a U+FFFD in the document stays); others by decoding each chunk
    alone."""
    if not _byte_level(tokenizer):
        return [tokenizer.decode(list(tokens[s:e])) for s, e in bounds]
    context = list(before[-CONTEXT:])
    pieces = tokenizer.convert_ids_to_tokens([*context, *tokens])
    try:
        data = bytes(_BYTE_OF[ch] for piece in pieces for ch in piece)
    except (KeyError, TypeError):  # a special token outside the byte alphabet: each chunk decoded alone
        return [tokenizer.decode(list(tokens[s:e])) for s, e in bounds]
    offsets = list(itertools.accumulate(map(len, pieces), initial=0))  # token i's bytes start at offsets[i]
    at = {i: _char_start(data, offsets[len(context) + i]) for i in {b for bound in bounds for b in bound}}
    return [data[at[s]:at[e]].decode("utf-8", errors="replace") for s, e in bounds]


_BYTE_LEVEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> is it byte-level BPE


def _byte_level(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` is byte-level BPE: it writes a space as "Ġ" (SentencePiece as "▁", and its byte tokens
    as "<0xE5>", which read as text would be wrong). Asked once per tokenizer."""
    try:
        return _BYTE_LEVEL[tokenizer]
    except (KeyError, TypeError):
        found = "Ġ" in "".join(tokenizer.convert_ids_to_tokens(tokenizer.encode(" a", add_special_tokens=False)))
        with contextlib.suppress(TypeError):  # (an object that takes no weak reference is asked every time)
            _BYTE_LEVEL[tokenizer] = found
        return found
