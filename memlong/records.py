"""Chunk records: what one stored chunk is, and the ONE set of rules every chunk must satisfy.

Contract:
    * :class:`Chunk` is one stored chunk (text, token span, K-V, counters, metadata).
    * :func:`check_chunk` is the single validator of a chunk's fields. :meth:`MemoryBank.add_chunks` applies it
      on the way in and the loader applies it to every saved record, so whatever a bank holds in memory can
      always be saved and loaded again (and a file the rules refuse can never enter a bank).
    * :func:`check_bank_config` is the single validator of a bank's constructor settings (the constructor and
      the loader use it), :func:`check_embeddings` of retriever vectors, :func:`check_text` of every string
      that is written to disk (namespaces, doc ids, texts, metadata), :func:`as_list` of every argument that
      takes a list of ids, namespaces or texts (one string is refused, not split into its characters).
    * :func:`parse_namespaces` turns a saved record plus its tensors back into chunks, naming the first
      problem as a :class:`~memlong.storage.MemoryFileError`; :func:`check_compatible` refuses a bank made by
      another embedder or model.

Rules in brief: texts are non-empty UTF-8 strings (no lone surrogates); doc ids are strings; spans are
``0 <= start <= end`` integers; token ids are non-negative integers, one per K-V position; metadata is a dict
of JSON values (string keys, finite numbers, at most :data:`MAX_DEPTH` levels); K-V are finite floating-point
``(layers, kv_heads, tokens >= 1, head_dim)`` tensors of equal shape; embeddings are finite, non-zero vectors.
Orders, counts and token ids are below ``2**63``; metadata integers take up to :data:`MAX_INT_BITS` bits.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import numbers
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memlong.embedder import TextEmbedder
from memlong.kv_payload import DenseKV, KVPayload, payload_from
from memlong.storage import MemoryFileError
from memlong.user_warning import warn

__all__ = ["MAX_DEPTH", "Chunk", "MemoryMismatchError", "as_list", "check_bank_config", "check_chunk",
           "check_compatible", "check_count", "check_embeddings", "check_namespace", "check_string", "check_text",
           "embedder_info", "metadata_nbytes", "parse_namespaces", "read_text_file"]

MAX_DEPTH = 32  # metadata nesting levels (the JSON reader's recursion limit is far above this)
MAX_INT = 2**63 - 1
MAX_INT_BITS = 4096  # metadata integers: about 1,200 digits in JSON
CHUNK_ID = re.compile(r"^[0-9a-f]{24}\Z")
# Fingerprint keys recorded for information only: paths differ between machines holding the same model.
_INFO_KEYS = ("model",)
_LATER_KEYS = ("sink_ids", "weights", "rope")  # added after banks were saved without them: absent on a side, not compared


class MemoryMismatchError(MemoryFileError):
    """A saved bank made by a different model, config or embedder than the one loading it."""


@dataclass
class Chunk:
    """One stored chunk. ``kv``: its payload (:mod:`memlong.kv_payload`); ``keys``/``values``: its K-V,
    ``(n_source_layers, n_kv_heads, tokens, head_dim)`` (dequantized on every read for int8 payloads).

    :meth:`MemoryBank.get` returns a copy: changing it changes nothing in the bank (the K-V tensors are shared
    with the bank, may be memory-mapped from a file, and must not be written in place)."""

    id: str
    namespace: str
    doc_id: str
    text: str
    span: tuple[int, int]  # token offsets [start, end) in its document
    order: int  # insertion order in the bank: document order within a document
    kv: KVPayload = field(repr=False)  # (a repr shows the text and where it lives; tokens and K-V are long)
    retrievals: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    tokens: tuple[int, ...] | None = field(default=None, repr=False)  # the token ids the K-V were computed from

    @property
    def keys(self) -> torch.Tensor:
        return self.kv.keys()

    @property
    def values(self) -> torch.Tensor:
        return self.kv.values()

    @property
    def n_tokens(self) -> int:
        return int(self.kv.shape[2])

    def copy(self) -> Chunk:
        """A copy whose fields (metadata included) can be changed without touching the bank."""
        return dataclasses.replace(self, metadata=json.loads(json.dumps(self.metadata)))


# ------------------------------------------------------------------ the shared rules
def _is_int(x: Any) -> bool:
    if type(x) is int:  # the common case (JSON, tokenizers), without the slow abstract-class check
        return -MAX_INT <= x <= MAX_INT
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and -MAX_INT <= int(x) <= MAX_INT


def _token_ids(tokens: Any) -> tuple[int, ...]:
    """``tokens`` as a tuple of ints >= 0; ValueError otherwise. Runs for every chunk a bank loads: plain ints (JSON,
    tokenizers) are checked in one pass of C loops (the general check per id took 1.6 s of a 20k-chunk bank's
    3.8 s reopen, 128 tokens a chunk)."""
    tokens = tokens.tolist() if hasattr(tokens, "tolist") else tokens  # numpy arrays, torch tensors
    if isinstance(tokens, (list, tuple)):
        if set(map(type, tokens)) <= {int}:
            if not tokens or (min(tokens) >= 0 and max(tokens) <= MAX_INT):
                return tuple(tokens)
        elif all(_is_int(t) and int(t) >= 0 for t in tokens):
            return tuple(int(t) for t in tokens)
    raise ValueError("token ids must be non-negative integers.")


def check_text(value: Any, what: str, *, empty: bool = False) -> str:
    """``value`` if it is a string UTF-8 can store (non-blank unless ``empty``); ValueError naming ``what``."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__} {str(value)[:50]!r}.")
    if not empty and not value.strip():
        raise ValueError(f"empty {what}: it has no text to embed or match (a chunk, to be retrieved by; a query, to "
                         "search with); give it some text.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode: it holds a lone surrogate character, which UTF-8 (files, the "
                         "tokenizer) cannot store; clean the text (e.g. text.encode('utf-8', 'replace').decode())."
                         ) from None
    return value


def as_list(value: Any, what: str) -> list[Any]:
    """``value`` (a list, tuple, set, numpy array, generator...) as a list, numpy strings as ``str``; TypeError
    naming ``what`` for one string or bytes (iterating it would give its characters), a dict or a non-iterable."""
    if what == "namespaces" and (isinstance(value, os.PathLike) or (isinstance(value, str) and os.sep in value)):
        raise TypeError(f"namespaces takes a list of namespace names, got the path {str(value)[:80]!r}: the folder is "
                        "the first argument; namespaces=[...] picks namespaces of the bank saved there (or leave it out).")
    if isinstance(value, (str, bytes, bytearray)):
        raise TypeError(f"{what} takes a list, got one {type(value).__name__} {value[:60]!r}: pass a list, e.g. "
                        f"{what}=[{value[:60]!r}].")
    if isinstance(value, os.PathLike):  # ingest(Path("doc.txt")): its text was meant
        raise TypeError(f"{what} takes text or a list, got the path {str(value)[:80]!r}: read the file first, e.g. "
                        "Path(p).read_text().")
    if isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise TypeError(f"{what} takes a list, got {type(value).__name__} {str(value)[:60]!r}: pass a list.")
    return [str(v) if isinstance(v, np.str_) else v for v in value]


def check_count(value: Any, what: str, meaning: str = "the number of hits; 0 returns none") -> int:
    """``value`` as an int; ValueError naming ``what`` (and ``meaning``) unless it is an integer >= 0 (numpy integers
    too, not bools): a number of hits such as ``k`` or ``similarity_top_k`` (2.5, "3" and None failed inside faiss)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {value!r} ({meaning}).")
    return int(value)


def check_string(value: Any, what: str) -> str:
    """``value`` if it is a string of valid Unicode (empty allowed); TypeError naming ``what`` for another type
    (bytes: decode them first), ValueError for lone surrogates (:func:`check_text`)."""
    if not isinstance(value, str):
        hint = " (decode bytes first, e.g. data.decode('utf-8'))" if isinstance(value, (bytes, bytearray)) else ""
        raise TypeError(f"{what} must be a string, got {type(value).__name__} {str(value)[:50]!r}{hint}.")
    return check_text(value, what, empty=True)


def check_namespace(namespace: Any) -> str:
    if not isinstance(namespace, str) or not namespace:
        raise ValueError(f"namespace must be a non-empty string, got {namespace!r}.")
    return check_text(namespace, "namespace", empty=True)


def _json_check(value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):  # any size the first release saved (hashes, UUIDs as ints) that JSON writes as digits
        if value.bit_length() > MAX_INT_BITS:  # (Python's str() refuses more than 4,300 digits)
            raise ValueError(f"an integer of {value.bit_length()} bits is too large (at most {MAX_INT_BITS} bits; store "
                             "it as a string)")
        return
    if isinstance(value, str):
        check_text(value, "a string", empty=True)
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"non-finite number {value}")
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            _json_check(v, depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"key {k!r} is not a string")
            check_text(k, "a key", empty=True)
            _json_check(v, depth + 1)
        return
    raise TypeError(f"value of type {type(value).__name__}")


def check_metadata(metadata: Any, what: str = "metadata", copy: bool = True) -> dict[str, Any]:
    """``metadata`` as a plain JSON dict (a copy, unless ``copy=False``: a dict just parsed from JSON, which no
    caller holds); ValueError naming the problem otherwise."""
    if not isinstance(metadata, dict):
        raise ValueError(f"{what} must be a dict, got {type(metadata).__name__}.")
    try:
        _json_check(metadata, 0)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} JSON cannot store ({exc}); keep metadata to str/int/float/bool/"
                         f"None/lists/dicts, finite numbers, at most {MAX_DEPTH} levels deep.") from None
    if not copy:
        return metadata
    return json.loads(json.dumps(metadata, ensure_ascii=False))  # tuples become lists, as after a load


def metadata_nbytes(metadata: dict[str, Any]) -> int:
    """Bytes ``metadata`` takes in a saved bank (what ``max_bytes`` counts for it)."""
    return len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode("utf-8")) if metadata else 0


def check_kv(keys: Any, values: Any, finite: bool = True) -> None:
    """ValueError unless ``keys``/``values`` are finite floating-point 4-D tensors of equal shape, >= 1 token."""
    if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)):
        raise ValueError("chunk K-V must be torch tensors.")
    if keys.dim() != 4 or keys.shape != values.shape or keys.shape[2] < 1 or 0 in keys.shape:
        raise ValueError(f"chunk K-V must be (layers, kv_heads, tokens >= 1, head_dim) with equal shapes, got keys "
                         f"{tuple(keys.shape)} and values {tuple(values.shape)}.")
    if not (keys.is_floating_point() and values.is_floating_point()):
        raise ValueError(f"chunk K-V must be floating point, got {keys.dtype} and {values.dtype}.")
    if finite and not (bool(torch.isfinite(keys).all()) and bool(torch.isfinite(values).all())):
        raise ValueError("chunk K-V hold NaN or infinite values (in the bank's dtype): they would poison every "
                         "answer that retrieves them. Check the model's outputs, or store K-V in float32.")


def check_chunk(*, text: Any, doc_id: Any, span: Any, keys: Any, values: Any, metadata: Any = None,
                tokens: Any = None, finite: bool = True, parsed: bool = False
                ) -> tuple[tuple[int, int], dict[str, Any], tuple[int, ...] | None]:
    """Validate one chunk's fields by the bank's rules; returns (span, metadata, tokens) normalised.

    ``finite=False`` skips reading every K-V value (a disk bank's memory-mapped K-V, checked when written).
    ``parsed``: the fields were just parsed from a saved record (the metadata is kept, not copied).

    Raises:
        ValueError: the first field that breaks a rule, named with its fix.
    """
    check_text(text, "chunk text")
    check_text(doc_id, "doc_id", empty=True)
    check_kv(keys, values, finite)
    if not (isinstance(span, (list, tuple)) and len(span) == 2 and all(map(_is_int, span))
            and 0 <= int(span[0]) <= int(span[1])):
        raise ValueError(f"span must be two integers 0 <= start <= end (token offsets in the document), got "
                         f"{str(span)[:60]}.")
    meta = check_metadata({} if metadata is None else metadata, copy=not parsed)
    if tokens is not None:
        tokens = _token_ids(tokens)
        if len(tokens) != keys.shape[2]:
            raise ValueError(f"{len(tokens)} token ids but K-V for {keys.shape[2]} tokens; give one id per K-V "
                             "position.")
    return (int(span[0]), int(span[1])), meta, tokens


def check_embeddings(vectors: np.ndarray) -> None:
    """ValueError unless every row is finite and of unit length (after ``faiss.normalize_L2``)."""
    with np.errstate(all="ignore"):
        unit = bool(np.isfinite(vectors).all()) and bool(
            np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3))
    if not unit:
        raise ValueError("embeddings must be finite, non-zero vectors (each is normalised to unit length); check "
                         "the embedder's output.")


def check_bank_config(capacity: Any, evict_oldest: Any, keep_newest: Any, max_bytes: Any) -> None:
    """ValueError unless the settings keep every namespace within ``capacity`` (and the bank within bytes)."""
    if not _is_int(capacity) or capacity <= 0:
        raise ValueError(f"capacity must be a positive integer number of tokens, got {capacity!r}.")
    for name, share in (("evict_oldest", evict_oldest), ("keep_newest", keep_newest)):
        if not isinstance(share, numbers.Real) or isinstance(share, bool) or not 0 <= share < 1:
            raise ValueError(f"{name} must be a share in [0, 1), got {share!r}.")
    if evict_oldest + keep_newest > 1:
        raise ValueError(f"evict_oldest + keep_newest must be at most 1 (shares of one namespace), got "
                         f"{evict_oldest} + {keep_newest}.")
    if max_bytes is not None and (not _is_int(max_bytes) or max_bytes <= 0):
        raise ValueError(f"max_bytes must be a positive integer or None, got {max_bytes!r}.")


# ------------------------------------------------------------------ loading
def embedder_info(embedder: TextEmbedder) -> dict[str, Any]:
    return {"name": str(getattr(embedder, "name", None) or type(embedder).__qualname__), "dim": int(embedder.dim)}


def _describe(info: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in info.items()) if isinstance(info, dict) else repr(info)


def check_compatible(path: Path, record: dict[str, Any], embedder: TextEmbedder,
                     fingerprint: dict[str, Any] | None) -> None:
    """Refuse a bank made by another embedder or (when ``fingerprint`` is given) another model/config."""
    stored_emb, mine = record.get("embedder"), embedder_info(embedder)
    if stored_emb != mine:
        raise MemoryMismatchError(
            f"The memory bank at {path} was built with the embedder {_describe(stored_emb)}, but it is being loaded "
            f"with {_describe(mine)}. Load it with the embedder that built it (its vectors are not comparable "
            "across embedders), or re-ingest the documents.")
    if fingerprint is None:
        return
    stored = record.get("fingerprint")
    if not isinstance(stored, dict):
        raise MemoryMismatchError(f"The memory bank at {path} records no model fingerprint ({stored!r}), but this "
                                  f"model is {_describe(fingerprint)}: it was not saved by MemLong.save_memory, so "
                                  "its K-V cannot be checked. Load it with MemoryBank.load instead.")
    keys = sorted(set(stored) | set(fingerprint), key=lambda k: (k in _INFO_KEYS, k))
    hashes = [set(map(str, d.get("weights") or ())) for d in (stored, fingerprint)]  # of two roundings: one shared
    differ = [k for k in keys if k not in _INFO_KEYS and (not hashes[0] & hashes[1] if k == "weights" else stored.get(k)
              != fingerprint.get(k)) and not (k in _LATER_KEYS and (k not in stored or k not in fingerprint))]
    if differ:
        raise MemoryMismatchError(
            f"The memory bank at {path} was made by a different model or config: "
            + "; ".join(f"{k}: saved {stored.get(k)!r}, this model {fingerprint.get(k)!r}" for k in differ)
            + (" (other weights: another checkpoint, an adapter merged or training since; a float32 checkpoint in "
               "bfloat16 against float16: load it in float32)" if "weights" in differ else "")
            + f". Saved: {_describe(stored)}. This model: {_describe(fingerprint)}. Load it with the model and "
            "config that built it, or re-ingest the documents with this one.")
    for k in _INFO_KEYS:  # (the same weights hash: a model moved or renamed is the same model)
        if stored.get(k) != fingerprint.get(k) and not ("weights" in stored and "weights" in fingerprint):
            warn(f"The memory bank at {path} was saved from model {stored.get(k)!r}, loading into "
                 f"{fingerprint.get(k)!r}; the shapes agree, so this is fine if both are the same weights.")


def _parse_chunk(c: Any, name: str, n_chunk: int, next_order: int, tensors: dict[str, torch.Tensor],
                 dtype: torch.dtype, mapped: bool) -> Chunk:
    """One saved chunk record and its K-V, by :func:`check_chunk`'s rules; ValueError names the problem.
    ``mapped``: memory-mapped K-V (a disk bank): their values are not read."""
    if not (isinstance(c, dict) and isinstance(c.get("id"), str) and CHUNK_ID.match(c["id"])):
        raise ValueError(f"chunk record {n_chunk} of namespace {name[:100]!r} has no valid id ({str(c)[:200]}).")
    if not (_is_int(c.get("order")) and 0 <= c["order"] < next_order and _is_int(c.get("retrievals"))
            and c["retrievals"] >= 0):
        raise ValueError(f"chunk {c['id']} has a malformed order or retrieval count.")
    try:
        kv = payload_from(lambda suffix: tensors.get(f"{suffix}.{n_chunk}"), dtype)
    except ValueError as exc:
        raise ValueError(f"the K-V of chunk {c['id']} are missing or malformed ({exc}).") from None
    dense = isinstance(kv, DenseKV)  # int8 codes are finite by construction, their scales checked above
    k = kv.k if dense else torch.empty(kv.shape, dtype=torch.float32, device="meta")
    try:
        span, meta, tokens = check_chunk(text=c.get("text"), doc_id=c.get("doc_id"), span=c.get("span"), keys=k,
                                         values=kv.v if dense else k, metadata=c.get("metadata"),
                                         tokens=c.get("tokens"), finite=dense and not mapped, parsed=True)
    except ValueError as exc:
        raise ValueError(f"chunk {c['id']} of namespace {name[:100]!r}: {exc}") from None
    return Chunk(id=c["id"], namespace=name, doc_id=c["doc_id"], text=c["text"], span=span, order=c["order"],
                 kv=kv, retrievals=c["retrievals"], metadata=meta, tokens=tokens)


def parse_namespaces(path: Path, record: dict[str, Any], tensors: dict[str, torch.Tensor], dim: int,
                     dtype: torch.dtype = torch.float16, mapped: bool = False
                     ) -> tuple[dict[str, tuple[list[Chunk], np.ndarray]], int]:
    """Validate every field of a saved record against its tensors; returns namespaces and the next order.

    Raises:
        MemoryFileError: the first problem found, named.
    """
    try:
        return _parse_namespaces(record, tensors, dim, dtype, mapped)
    except ValueError as exc:
        raise MemoryFileError(f"Cannot load the memory bank at {path}: {exc} The files are corrupted or were not "
                              "written by memlong.") from None


def _parse_namespaces(record: dict[str, Any], tensors: dict[str, torch.Tensor], dim: int, dtype: torch.dtype,
                      mapped: bool) -> tuple[dict[str, tuple[list[Chunk], np.ndarray]], int]:
    spaces, next_order = record.get("namespaces"), record.get("next_order")
    if not isinstance(spaces, list) or not _is_int(next_order) or next_order < 0:
        raise ValueError("'namespaces' or 'next_order' is missing or malformed.")
    out: dict[str, tuple[list[Chunk], np.ndarray]] = {}
    seen_ids: set[str] = set()
    seen_orders: set[int] = set()
    used = set()
    n_chunk = 0
    shift = _first_release_shift(spaces, tensors)
    for j, space in enumerate(spaces):
        if not isinstance(space, dict) or not isinstance(space.get("name"), str) or not space["name"]:
            raise ValueError(f"namespace entry {j} is malformed.")
        name, items = check_namespace(space["name"]), space.get("chunks")
        if name in out or not isinstance(items, list):
            raise ValueError(f"namespace {name[:100]!r} is duplicated or malformed.")
        chunks = []
        for c in items:
            index = n_chunk + shift(j)  # the chunk's K-V tensors are "k.<index>", "v.<index>"
            chunk = _parse_chunk(c, name, index, next_order, tensors, dtype, mapped)
            if chunk.id in seen_ids or chunk.order in seen_orders:
                raise ValueError(f"chunk id {chunk.id} or its order {chunk.order} appears twice.")
            shape, first = chunk.kv.shape, chunks[0].kv.shape if chunks else None
            if first is not None and (shape[:2], shape[3]) != (first[:2], first[3]):
                raise ValueError(f"chunk {chunk.id} has K-V of shape {tuple(shape)}, unlike the other "
                                 f"chunks of namespace {name[:100]!r} ({tuple(first)}).")
            seen_ids.add(chunk.id)
            seen_orders.add(chunk.order)
            used |= {f"{suffix}.{index}" for suffix in chunk.kv.named()}
            chunks.append(chunk)
            n_chunk += 1
        emb = tensors.get(f"e.{j}")
        if emb is None or emb.dtype != torch.float32 or tuple(emb.shape) != (len(chunks), dim):
            raise ValueError(f"the embeddings of namespace {name[:100]!r} are missing or not ({len(chunks)}, {dim}) "
                             "float32.")
        vectors = np.ascontiguousarray(emb.numpy(), dtype=np.float32)
        try:
            check_embeddings(vectors)
        except ValueError:
            raise ValueError(f"the embeddings of namespace {name[:100]!r} are not unit vectors.") from None
        used.add(f"e.{j}")
        out[name] = (chunks, vectors)
    extra = set(tensors) - used
    if extra:
        raise ValueError(f"the tensor file holds unexpected tensors ({sorted(extra)[:3]}).")
    return out, next_order


def _first_release_shift(spaces: list[Any], tensors: dict[str, torch.Tensor]) -> Callable[[int], int]:
    """How far the K-V tensors of the ``j``-th namespace are numbered past their chunks' count: 0, except in saves of
    three or more namespaces by memlong before 5 December 2026, which numbered chunk ``n`` of namespace ``j``
    ``k.<n + j // 2>`` (the count included the earlier namespaces' embedding tensors). Those files hold every
    tensor, so they are read by that numbering when it, and not today's, matches the file exactly."""
    counts = [len(s["chunks"]) if isinstance(s, dict) and isinstance(s.get("chunks"), list) else 0 for s in spaces]
    keys = {name for name in tensors if name.startswith("k.")}
    if len(spaces) < 3 or keys == {f"k.{n}" for n in range(sum(counts))}:
        return lambda j: 0
    starts = itertools.accumulate(counts, initial=0)
    old = {f"k.{start + i + j // 2}" for j, (start, count) in enumerate(zip(starts, counts)) for i in range(count)}
    return (lambda j: j // 2) if keys == old else (lambda j: 0)


def read_text_file(path: str | Path) -> str:
    """The text of a UTF-8 file; ValueError naming the file when it is not UTF-8 text (a binary file, UTF-16, Latin-1:
    read with errors ignored, they trained and scored on byte garbage)."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not UTF-8 text (byte {exc.start}); re-save it as UTF-8, or leave it out."
                         ) from None
    if "\x00" in text:
        raise ValueError(f"{str(path)!r} holds NUL bytes, so it is not text (a binary file, or UTF-16); re-save it as "
                         "UTF-8 text, or leave it out.")
    return text
