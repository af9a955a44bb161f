"""A namespace's search indexes and how they rank chunks: dense (faiss), lexical (BM25), hybrid (both, fused).

Contract:
    * :data:`SearchMode` / :data:`SEARCH_MODES` / :func:`check_mode` are the one definition of the search
      modes; the bank, the model config, the CLI and both framework adapters use them.
    * ``"dense"``: inner product of unit embeddings (the paper's retriever). ``"lexical"``: BM25 (k1=1.2,
      b=0.75) over :func:`words` (case-folded; each CJK character a word); only chunks sharing a word with the query
      score. ``"hybrid"``: reciprocal rank fusion of both rankings (:func:`fuse`), each looked at deeper than ``k``.
    * Ties are broken by insertion order (document order), so rankings are deterministic.

Example:
    >>> index = Lexical(); index.add(["a1", "a2"], ["the iron key", "a wooden door"])
    >>> index.top("iron key", want=1, skip=set())
    [('a1', 1.386...)]
"""

from __future__ import annotations

import collections
import functools
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

import faiss
import numpy as np

from memlong.choices import SEARCH_MODES, SearchMode

__all__ = ["RRF_K", "SEARCH_MODES", "Lexical", "NamespaceIndex", "SearchMode", "check_ann_min", "check_mode", "depth",
           "fuse", "words"]

RRF_K = 60  # reciprocal rank fusion: score = sum over rankings of 1 / (RRF_K + rank), the usual constant


_ASCII_WORD = re.compile(r"\w+")
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"  # kana, ideographs, hangul


@functools.cache
def _word_patterns() -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    """(a word, a CJK character, a CJK word's parts). A word is letters and digits with their combining marks
    (Devanagari vowel signs, Arabic harakat, the accents of decomposed text: ``\\w`` alone cut words at them); in
    it each CJK ideograph, kana or hangul syllable is a word of its own, as those scripts put no spaces between
    words (``\\w+`` made a whole clause one word that no query matched). Built on first use (a scan of Unicode)."""
    marks, start, last = [], None, -1
    for code in [*range(0x30000), *range(0xE0000, 0xE1000), -1]:  # the planes that hold marks
        mark = code >= 0 and unicodedata.category(chr(code)).startswith("M")
        if mark and start is None:
            start = code
        elif not mark and start is not None:
            marks.append(f"{re.escape(chr(start))}-{re.escape(chr(last))}")
            start = None
        last = code
    return (re.compile(f"[\\w{''.join(marks)}]+"), re.compile(f"[{_CJK}]"), re.compile(f"[{_CJK}]|[^{_CJK}]+"))


def check_mode(mode: Any) -> SearchMode:
    """``mode`` if it is a search mode; ValueError naming the valid ones otherwise."""
    if mode not in SEARCH_MODES:
        raise ValueError(f"search mode must be 'dense', 'lexical' or 'hybrid', got {mode!r}.")
    return mode


def check_ann_min(value: Any) -> int | None:
    """``value`` if it is a valid ``ann_min_chunks`` (None, or an integer >= 1000); ValueError otherwise."""
    if value is not None and (type(value) is not int or value < 1000):
        raise ValueError(f"ann_min_chunks must be None (exact search) or at least 1000 (an IVF index trains on the "
                         f"namespace's own vectors), got {value!r}.")
    return value


def words(text: str) -> list[str]:
    """The words BM25 counts: NFKC-normalized (composed accents, ligatures and full-width forms as plain letters),
    case-folded (``Straße`` = ``STRASSE``), split by :func:`_word_patterns`. Scripts written without spaces
    other than CJK (Thai, Lao, Khmer, Burmese) stay one word per run of letters, so lexical search does not serve them;
    dense search does.

    Example:
        >>> words("Café, 北京! हिन्दी")
        ['café', '北', '京', 'हिन्दी']
    """
    if text.isascii():  # (the same words, faster)
        return _ASCII_WORD.findall(text.lower())
    word, cjk, parts = _word_patterns()
    found: list[str] = []
    for w in word.findall(unicodedata.normalize("NFKC", text).casefold()):
        found.extend(parts.findall(w) if cjk.search(w) else (w,))
    return found


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

    Every chunk gets a slot (insertion order; a removed chunk's slot stays empty until more than half of the
    slots are empty, when the live ones are renumbered in order, so a namespace that keeps evicting does not grow
    its index or its query cost). Postings are dicts for cheap
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
        postings, arrays = self.postings, self._arrays  # (one loop per word of every chunk: a reopen runs it all)
        for cid, text in zip(ids, texts):
            found = words(text)
            slot = len(self.id_of)
            counts = collections.Counter(found)
            for word, count in counts.items():
                postings[word][slot] = count
            if arrays:  # cached postings of these words are stale (none are cached while a bank loads)
                for word in counts:
                    arrays.pop(word, None)
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
        if len(self.id_of) > 64 and 2 * len(self.slot_of) < len(self.id_of):
            self._renumber()

    def _renumber(self) -> None:
        """Drop the empty slots; live chunks keep their order (ties in :meth:`top` are broken by slot)."""
        live = [slot for slot, cid in enumerate(self.id_of) if cid is not None]
        new_slot = {old: new for new, old in enumerate(live)}
        self.postings = collections.defaultdict(dict, {
            word: {new_slot[slot]: count for slot, count in post.items()} for word, post in self.postings.items()})
        self.id_of = [self.id_of[slot] for slot in live]
        self.words_of = [self.words_of[slot] for slot in live]
        self.length_of = [self.length_of[slot] for slot in live]
        self.slot_of = {cid: slot for slot, cid in enumerate(self.id_of)}
        self._arrays.clear()

    def top(self, query: str, want: int, skip: set[str]) -> list[tuple[str, float]]:
        """The ``want`` best-scoring chunks sharing a word with ``query`` (not in ``skip``), best first."""
        n = len(self.slot_of)
        if n == 0 or want <= 0:
            return []
        if self._lengths is None:
            self._lengths = np.asarray(self.length_of, dtype=np.float64)
        norm = self.K1 * (1.0 - self.B + self.B * self._lengths / max(self.total / n, 1.0))
        scores = np.zeros(len(self.id_of))
        for word in dict.fromkeys(words(query)):  # (query order, not a set's: the same float sums in every process)
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
        hits = np.flatnonzero(scores)  # (slots ascending: insertion order)
        if len(hits) > want:  # every hit as good as the want-th, so that ties at the cut go by slot, not at random
            hits = hits[scores[hits] >= -np.partition(-scores[hits], want - 1)[want - 1]]
        hits = hits[np.argsort(-scores[hits], kind="stable")][:want]
        return [(self.id_of[i], float(scores[i])) for i in hits]


class NamespaceIndex:
    """One namespace's dense index, BM25 index, and totals (tokens, bytes). Changed only under the bank's write
    lock. ``embeddings`` row i is chunk ``ids[i]``.

    Dense search is exact (faiss ``IndexFlatIP``; a removal compacts its rows in place, a GPU one is rebuilt) until the
    namespace holds ``ann_min`` chunks (``None``: always exact). From then on it is an inverted-file index
    (``IndexIVFFlat``, inner product) with ``nlist ~ 4 sqrt(n)`` lists, trained on the namespace's embeddings and
    trained again whenever the namespace has doubled since; each chunk is stored under a slot number, deletes
    remove exactly those slots (``remove_ids``), and a search scans the ``nprobe`` nearest lists
    (``ann_probe`` of the lists, at least 8): approximate, with recall measured in ``benchmarks/ann.py``."""

    def __init__(self, dim: int, use_gpu: bool, ann_min: int | None = None, ann_probe: float = 1 / 16) -> None:
        self.dim = dim
        self.use_gpu = use_gpu
        self.ann_min, self.ann_probe = ann_min, ann_probe
        self.lexical = Lexical()
        self.ids: list[str] = []
        self._rows = np.zeros((0, dim), dtype=np.float32)  # embeddings in ids order, then spare rows
        self.tokens = 0
        self.nbytes = 0  # K-V + embeddings + texts + metadata of its chunks
        self.index: faiss.Index | None = self._new_index()
        self.ann: faiss.IndexIVFFlat | None = None
        self.slot_of: dict[str, int] = {}  # with an IVF index: chunk id -> its id in the index
        self.id_at: dict[int, str] = {}
        self.trained_at = 0
        self.docs: dict[str, set[str]] = {}  # document id -> its chunk ids (one document's chunks without a scan)
        self.doc_of: dict[str, str] = {}

    def _new_index(self) -> faiss.Index:
        index = faiss.IndexFlatIP(self.dim)
        if self.use_gpu:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        return index

    @property
    def embeddings(self) -> np.ndarray:
        """``(chunks, dim)`` unit embeddings in ``ids`` order: a view of rows that grow by doubling (a copy of all
        of them on every add made a long ingest quadratic)."""
        return self._rows[:len(self.ids)]

    def add(self, ids: list[str], vectors: np.ndarray, texts: Sequence[str], docs: Sequence[str]) -> None:
        """Index chunks ``ids`` (their unit embeddings ``vectors``, texts and document ids)."""
        n = len(self.ids)
        self.ids.extend(ids)
        for cid, doc in zip(ids, docs, strict=True):
            self.docs.setdefault(doc, set()).add(cid)
            self.doc_of[cid] = doc
        if len(self.ids) > len(self._rows):
            grown = np.zeros((max(len(self.ids), 2 * len(self._rows)), self.dim), dtype=np.float32)
            grown[:n] = self._rows[:n]
            self._rows = grown
        self._rows[n:len(self.ids)] = vectors
        self.lexical.add(ids, texts)
        if self.ann is not None and len(self.ids) < 2 * self.trained_at:
            self._ann_add(ids, vectors)
        elif self.ann_min is not None and len(self.ids) >= self.ann_min:
            self._train()
        elif self.index is not None:
            self.index.add(vectors)

    def remove(self, drop: set[str]) -> None:
        self.lexical.remove(drop)
        for cid in drop:
            same = self.docs[doc := self.doc_of.pop(cid)]
            same.discard(cid)
            if not same:
                del self.docs[doc]
        n = len(self.ids)
        dead = np.fromiter((cid in drop for cid in self.ids), dtype=bool, count=n)
        first = int(dead.argmax()) if n else 0  # rows before the first removed one stay where they are
        kept = self._rows[first:n][~dead[first:]]  # (in place: the rows keep their spare room for the next add)
        self._rows[first:first + len(kept)] = kept
        self.ids = [cid for cid in self.ids if cid not in drop]
        if self.ann is not None:
            slots = np.array([self.slot_of.pop(c) for c in drop if c in self.slot_of], dtype=np.int64)
            for slot in slots.tolist():
                del self.id_at[slot]
            self.ann.remove_ids(slots)
        elif self.use_gpu:
            self.index = self._new_index()
            if self.ids:
                self.index.add(self.embeddings)
        else:  # rows compacted in place by faiss, in C (rebuilding the index copied every row twice, in Python)
            self.index.remove_ids(faiss.IDSelectorBatch(np.flatnonzero(dead).astype(np.int64)))

    def dense(self, vector: np.ndarray, want: int) -> list[tuple[str, float]]:
        """The ``want`` chunks with the largest inner product with ``vector`` ``(1, dim)``, best first; equal scores
        in insertion order, also across the cut: faiss returns ties in any order, so a tie there is searched again
        with ``range_search`` for every chunk scoring at least as much (one more pass; not on a GPU index, which has
        no range search: there ties across the cut come in faiss's order)."""
        found = self._dense(vector, min(want + 1, self.ntotal))
        if len(found) > want and found[want][2] == found[want - 1][2] and not self.use_gpu:
            index = self.ann if self.ann is not None else self.index
            assert index is not None
            radius = float(np.nextafter(np.float32(found[want - 1][2]), np.float32(-np.inf)))
            lims, scores, places = index.range_search(vector, radius)
            names = self.id_at if self.ann is not None else self.ids
            ranged = [(int(n), names[n], float(sc)) for sc, n in zip(scores[lims[0]:lims[1]], places[lims[0]:lims[1]])]
            found = ranged if len(ranged) >= want else found  # (its scores are faiss's own: never fewer, but be sure)
        found.sort(key=lambda hit: (-hit[2], hit[0]))
        return [(cid, score) for _, cid, score in found[:want]]

    def _dense(self, vector: np.ndarray, want: int) -> list[tuple[int, str, float]]:
        """``(row or slot, id, score)`` of faiss's ``want`` best (rows and slots grow with insertion order)."""
        if self.ann is not None:
            scores, slots = self.ann.search(vector, want)
            return [(int(s), self.id_at[s], float(sc)) for sc, s in zip(scores[0], slots[0]) if s >= 0]
        assert self.index is not None
        scores, rows = self.index.search(vector, want)
        return [(int(r), self.ids[r], float(sc)) for sc, r in zip(scores[0], rows[0]) if r >= 0]

    @property
    def ntotal(self) -> int:
        """Vectors in the dense index (equal to ``len(ids)`` at all times)."""
        return self.ann.ntotal if self.ann is not None else self.index.ntotal  # type: ignore[union-attr]

    def _train(self) -> None:
        """(Re)build the IVF index from every embedding of the namespace."""
        n = len(self.ids)
        nlist = int(min(max(16, 4 * math.sqrt(n)), max(16, n // 39)))  # faiss wants >= 39 points per list
        ann = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ann.cp.max_points_per_centroid, ann.cp.niter = 64, 10  # k-means on a sample of 64 points per list, 10 rounds
        ann.train(self.embeddings)
        ann.nprobe = max(8, int(nlist * self.ann_probe))
        self.ann, self.index, self.trained_at = ann, None, n
        self.slot_of, self.id_at = {}, {}
        self._next_slot = 0
        self._ann_add(self.ids, self.embeddings)

    def _ann_add(self, ids: list[str], vectors: np.ndarray) -> None:
        assert self.ann is not None
        slots = np.arange(self._next_slot, self._next_slot + len(ids), dtype=np.int64)
        self._next_slot += len(ids)
        for cid, slot in zip(ids, slots.tolist()):
            self.slot_of[cid], self.id_at[slot] = slot, cid
        if len(ids):
            self.ann.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), slots)
