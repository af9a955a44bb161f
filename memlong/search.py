"""A namespace's search indexes and how they rank chunks: dense (faiss), lexical (BM25), hybrid (both, fused).

Contract:
    * :data:`SearchMode` / :data:`SEARCH_MODES` / :func:`check_mode` are the one definition of the search
      modes; the bank, the model config, the CLI and both framework adapters use them.
    * ``"dense"``: inner product of unit embeddings (the paper's retriever). ``"lexical"``: BM25 (k1=1.2,
      b=0.75) over lower-cased ``\\w+`` words; only chunks sharing a word with the query score. ``"hybrid"``:
      reciprocal rank fusion of both rankings (:func:`fuse`), each looked at deeper than ``k``.
    * Ties are broken by insertion order (document order), so rankings are deterministic.

Example:
    >>> index = Lexical(); index.add(["a1", "a2"], ["the iron key", "a wooden door"])
    >>> index.top("iron key", want=1, skip=set())
    [('a1', 1.2...)]
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import faiss
import numpy as np

__all__ = ["RRF_K", "SEARCH_MODES", "Lexical", "NamespaceIndex", "SearchMode", "check_mode", "depth", "fuse", "words"]

SearchMode = Literal["dense", "lexical", "hybrid"]
SEARCH_MODES: tuple[str, ...] = get_args(SearchMode)
RRF_K = 60  # reciprocal rank fusion: score = sum over rankings of 1 / (RRF_K + rank), the usual constant
_WORD = re.compile(r"\w+")


def check_mode(mode: Any) -> SearchMode:
    """``mode`` if it is a search mode; ValueError naming the valid ones otherwise."""
    if mode not in SEARCH_MODES:
        raise ValueError(f"search mode must be 'dense', 'lexical' or 'hybrid', got {mode!r}.")
    return mode


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def depth(mode: SearchMode, k: int) -> int:
    """How many candidates each ranking contributes: ``k`` alone, deeper when rankings are fused, so that a
    chunk ranked well by only one side can surface."""
    return k if mode != "hybrid" else max(4 * k, 50)


def fuse(rankings: Sequence[Sequence[tuple[str, float]]], order_of: Callable[[str], int]) -> list[tuple[str, float]]:
    """Reciprocal rank fusion of ``rankings`` (each best first); ties broken by ``order_of`` (insertion order)."""
    fused: dict[str, float] = collections.defaultdict(float)
    for ranking in rankings:
        for rank, (cid, _) in enumerate(ranking):
            fused[cid] += 1.0 / (RRF_K + rank + 1)
    return sorted(fused.items(), key=lambda item: (-item[1], order_of(item[0])))


class Lexical:
    """BM25 (k1=1.2, b=0.75) over one namespace's chunk texts: an inverted index, updated with the namespace.

    Every chunk gets a slot (insertion order; a removed chunk's slot stays empty). Postings are dicts for cheap
    updates and are turned into numpy arrays, cached per word until the word's postings change, so a query
    costs a few vector operations per query word (``benchmarks/cpu.py`` measures it)."""

    K1, B = 1.2, 0.75

    def __init__(self) -> None:
        self.postings: dict[str, dict[int, int]] = collections.defaultdict(dict)  # word -> {slot: count}
        self.slot_of: dict[str, int] = {}
        self.id_of: list[str | None] = []
        self.words_of: list[tuple[str, ...]] = []
        self.length_of: list[int] = []
        self.total = 0
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._lengths: np.ndarray | None = None

    def add(self, ids: Sequence[str], texts: Sequence[str]) -> None:
        for cid, text in zip(ids, texts):
            found = words(text)
            slot = len(self.id_of)
            counts = collections.Counter(found)
            for word, count in counts.items():
                self.postings[word][slot] = count
                self._arrays.pop(word, None)
            self.slot_of[cid] = slot
            self.id_of.append(cid)
            self.words_of.append(tuple(counts))
            self.length_of.append(len(found))
            self.total += len(found)
        self._lengths = None

    def remove(self, drop: set[str]) -> None:
        for cid in drop.intersection(self.slot_of):
            slot = self.slot_of.pop(cid)
            for word in self.words_of[slot]:
                post = self.postings[word]
                del post[slot]
                if not post:
                    del self.postings[word]
                self._arrays.pop(word, None)
            self.id_of[slot], self.words_of[slot] = None, ()
            self.total -= self.length_of[slot]
            self.length_of[slot] = 0
        self._lengths = None

    def top(self, query: str, want: int, skip: set[str]) -> list[tuple[str, float]]:
        """The ``want`` best-scoring chunks sharing a word with ``query`` (not in ``skip``), best first."""
        n = len(self.slot_of)
        if n == 0 or want <= 0:
            return []
        if self._lengths is None:
            self._lengths = np.asarray(self.length_of, dtype=np.float64)
        norm = self.K1 * (1.0 - self.B + self.B * self._lengths / max(self.total / n, 1.0))
        scores = np.zeros(len(self.id_of))
        for word in set(words(query)):
            post = self.postings.get(word)
            if not post:
                continue
            if word not in self._arrays:
                self._arrays[word] = (np.fromiter(post.keys(), dtype=np.int64, count=len(post)),
                                      np.fromiter(post.values(), dtype=np.float64, count=len(post)))
            slots, counts = self._arrays[word]
            idf = math.log(1.0 + (n - len(post) + 0.5) / (len(post) + 0.5))
            scores[slots] += idf * counts * (self.K1 + 1.0) / (counts + norm[slots])
        for cid in skip.intersection(self.slot_of):
            scores[self.slot_of[cid]] = 0.0
        hits = np.flatnonzero(scores)
        if len(hits) > want:
            hits = hits[np.argpartition(-scores[hits], want - 1)[:want]]
        hits = hits[np.argsort(-scores[hits], kind="stable")]
        return [(self.id_of[i], float(scores[i])) for i in hits]


class NamespaceIndex:
    """One namespace's faiss index (row i <-> ids[i]), BM25 index, and totals (tokens, bytes). Changed only
    under the bank's write lock; every removal rebuilds the faiss index from the kept embeddings."""

    def __init__(self, dim: int, use_gpu: bool) -> None:
        self.dim = dim
        self.use_gpu = use_gpu
        self.lexical = Lexical()
        self.ids: list[str] = []
        self.embeddings = np.zeros((0, dim), dtype=np.float32)
        self.tokens = 0
        self.nbytes = 0  # K-V + embeddings + texts + metadata of its chunks
        self.index = self._new_index()

    def _new_index(self) -> faiss.Index:
        index = faiss.IndexFlatIP(self.dim)
        if self.use_gpu:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        return index

    def add(self, ids: list[str], vectors: np.ndarray, texts: Sequence[str]) -> None:
        self.index.add(vectors)
        self.ids.extend(ids)
        self.embeddings = np.concatenate([self.embeddings, vectors], axis=0)
        self.lexical.add(ids, texts)

    def remove(self, drop: set[str]) -> None:
        self.lexical.remove(drop)
        keep = [i for i, cid in enumerate(self.ids) if cid not in drop]
        self.ids = [self.ids[i] for i in keep]
        self.embeddings = np.ascontiguousarray(self.embeddings[keep])
        self.index = self._new_index()
        if len(keep):
            self.index.add(self.embeddings)
