"""A stateful property test of the memory bank (issue 16): random adds, deletes, evictions, resets, saves, loads
and restores over several namespaces, with the bank's invariants checked after every step.

Invariants after every step:
    * per namespace: faiss rows, stored embeddings, ids, BM25 slots, K-V and texts are aligned (row i is chunk
      ids[i], its embedding is the unit vector of that chunk; the lexical index holds exactly those ids);
    * every namespace within ``capacity`` tokens, the bank within ``max_bytes``; token and byte totals equal
      what the chunks add up to;
    * nothing is visible across namespaces (get/fetch/delete with another namespace fail, search returns only
      the caller's chunks);
    * save -> load gives an equal bank (every field, every namespace), and a refused add changes nothing.
Bounded for CI: ``max_examples`` x ``stateful_step_count`` steps, no deadline, derandomized (no flaky timing).
"""

import shutil
import tempfile
import warnings
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from helpers import named_by_manifest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_persistence import HashEmbedder, assert_same_bank

from memlong import MemoryBank, MemoryEvictionWarning, MemoryFullError, UnknownChunkError, journal

NAMESPACES = ("alice", "bob", "carol")
CAPACITY, MAX_BYTES = 60, 40_000
DIM, HEADS, LAYERS = 4, 2, 2

metadata = st.dictionaries(st.text(max_size=5), st.one_of(
    st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10), st.lists(st.integers(0, 9), max_size=3)), max_size=3)
chunk = st.tuples(st.integers(1, 12), metadata, st.text(st.characters(codec="utf-8"), min_size=1, max_size=30))


def snapshot(bank):
    out = {}
    for ns in bank.namespaces():
        out[ns] = [(c.id, c.text, c.doc_id, c.span, c.metadata, c.retrievals, c.keys.clone())
                   for c in (bank.get(i, namespace=ns) for i in bank.chunk_ids(ns))]
    return out


def same(a, b):
    return list(a) == list(b) and all(  # namespaces in the same order
        len(a[n]) == len(b[n]) and all(x[:6] == y[:6] and torch.equal(x[6], y[6]) for x, y in zip(a[n], b[n]))
        for n in a)


class BankMachine(RuleBasedStateMachine):
    """Several tenants sharing one bank; the files are the source of truth after each save."""

    @initialize()
    def start(self):
        self.dir = Path(tempfile.mkdtemp(prefix="bank-stateful-"))
        self.bank = MemoryBank(embedder=HashEmbedder(), capacity=CAPACITY, max_bytes=MAX_BYTES, dtype=torch.float32)
        self.saved = None  # snapshot of what the directory holds
        self.step = 0

    def teardown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ writes
    @rule(ns=st.sampled_from(NAMESPACES), chunks=st.lists(chunk, min_size=1, max_size=4),
          doc=st.sampled_from(["d1", "d2", None]), start=st.integers(0, 10**6))
    def add(self, ns, chunks, doc, start):
        self.step += 1
        texts = [f"{text} #{self.step}-{i}" for i, (_, _, text) in enumerate(chunks)]
        kv = [torch.randn(LAYERS, HEADS, n, DIM) for n, _, _ in chunks]
        spans, pos = [], start
        for n, _, _ in chunks:
            spans.append((pos, pos + n))
            pos += n
        before = snapshot(self.bank)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MemoryEvictionWarning)
                ids = self.bank.add_chunks(texts, keys=kv, values=[k * 2 for k in kv], namespace=ns, doc_id=doc,
                                           spans=spans, metadata=[m for _, m, _ in chunks],
                                           tokens=[list(range(n)) for n, _, _ in chunks])
        except (MemoryFullError, ValueError):
            assert same(before, snapshot(self.bank))  # a refused add writes nothing
            return
        for cid in ids:  # evicted right away, or stored with everything it was given
            if cid in self.bank.chunk_ids(ns):
                stored = self.bank.get(cid, namespace=ns)
                i = ids.index(cid)
                assert stored.text == texts[i] and stored.span == spans[i] and torch.equal(stored.keys, kv[i])

    @rule(ns=st.sampled_from(NAMESPACES), data=st.data(), chunks=st.lists(chunk, max_size=3))
    def upsert(self, ns, data, chunks):
        """An adapter's upsert: some (or all) of a namespace's chunks swapped for 0-3 new ones in one step."""
        self.step += 1
        held = self.bank.chunk_ids(ns)
        old = data.draw(st.lists(st.sampled_from(held), unique=True)) if held else []
        texts = [f"{text} #{self.step}-{i}" for i, (_, _, text) in enumerate(chunks)]
        kv = [torch.randn(LAYERS, HEADS, n, DIM) for n, _, _ in chunks]
        before = snapshot(self.bank)
        try:
            ids = self.bank.add_chunks(texts, keys=kv, values=[k * 2 for k in kv], namespace=ns, replace=old,
                                       metadata=[m for _, m, _ in chunks], atomic=True)
        except (MemoryFullError, ValueError):
            assert same(before, snapshot(self.bank))  # refused whole
            return
        now = self.bank.chunk_ids(ns)  # what is left (eviction may take older chunks) in order, then every new one
        assert now == [c for c in held if c not in old and c in now] + ids

    @rule(ns=st.sampled_from(NAMESPACES), bad=st.sampled_from(["span", "nan", "doc", "surrogate", "meta"]))
    def add_bad(self, ns, bad):
        before = snapshot(self.bank)
        k = torch.randn(LAYERS, HEADS, 2, DIM)
        kwargs = {"span": dict(spans=[(3, 1)]), "nan": dict(keys=[k * float("nan")]), "doc": dict(doc_id=5),
                  "surrogate": dict(metadata=[{"x": "\udc80"}]), "meta": dict(metadata=[{"n": float("inf")}])}[bad]
        with pytest.raises(ValueError):
            self.bank.add_chunks(["bad chunk"], **{"keys": [k], "values": [k], "namespace": ns, **kwargs})
        assert same(before, snapshot(self.bank))

    @rule(ns=st.sampled_from(NAMESPACES), data=st.data())
    def delete_ids(self, ns, data):
        ids = self.bank.chunk_ids(ns)
        drop = data.draw(st.lists(st.sampled_from(ids), unique=True, max_size=3)) if ids else []
        assert self.bank.delete(drop, namespace=ns) == len(drop)
        assert not set(drop) & set(self.bank.chunk_ids(ns))

    @rule(ns=st.sampled_from(NAMESPACES), doc=st.sampled_from(["d1", "d2", "nobody"]))
    def delete_doc(self, ns, doc):
        self.bank.delete(namespace=ns, doc_id=doc)
        assert all(self.bank.get(c, namespace=ns).doc_id != doc for c in self.bank.chunk_ids(ns))

    @rule(data=st.data(), query=st.text(max_size=20), mode=st.sampled_from(["dense", "hybrid"]))
    def search(self, data, query, mode):
        held = [n for n in NAMESPACES if self.bank.chunk_ids(n)]  # mostly a namespace with chunks: counters change
        ns = data.draw(st.sampled_from(held if held and data.draw(st.integers(0, 3)) else NAMESPACES))
        order = {c: i for i, c in enumerate(self.bank.chunk_ids(ns))}
        hits = self.bank.search(query if query.strip() else "x", namespace=ns, k=3, mode=mode)  # (blank: refused)
        assert {h.chunk_id for h in hits} <= set(order)
        for a, b in zip(hits, hits[1:]):  # best first; equal scores in insertion order
            assert a.score > b.score or (a.score == b.score and order[a.chunk_id] < order[b.chunk_id])

    @rule(ns=st.one_of(st.none(), st.sampled_from(NAMESPACES)))
    def reset(self, ns):
        self.bank.reset(ns)
        assert self.bank.chunk_ids(ns) == [] if ns else self.bank.namespaces() == []

    # ------------------------------------------------------------------ files
    @rule(some=st.booleans())
    def save(self, some):
        names = self.bank.namespaces()[:1] if some and self.bank.namespaces() else None
        self.bank.save(self.dir / "bank", namespaces=names)
        loaded = MemoryBank.load(self.dir / "bank", embedder=HashEmbedder())
        if names is None:
            assert_same_bank(self.bank, loaded)  # save -> load gives an equal bank
        self.saved = snapshot(loaded)

    @precondition(lambda self: self.saved is not None)
    @rule()
    def load(self):
        self.bank = MemoryBank.load(self.dir / "bank", embedder=HashEmbedder())
        assert same(snapshot(self.bank), self.saved)

    @precondition(lambda self: self.saved)
    @rule(data=st.data())
    def restore(self, data):
        ns = data.draw(st.sampled_from(sorted(self.saved)))
        others = {n: v for n, v in snapshot(self.bank).items() if n != ns}
        try:
            self.bank.restore(self.dir / "bank", namespaces=[ns])
        except MemoryFullError:  # the other tenants hold the bytes: refused, nothing changed
            return
        now = snapshot(self.bank)
        assert same({ns: now[ns]}, {ns: self.saved[ns]})
        assert same({n: v for n, v in now.items() if n != ns}, others)

    # ------------------------------------------------------------------ invariants
    @invariant()
    def aligned_bounded_isolated(self):
        bank = getattr(self, "bank", None)
        if bank is None:
            return
        total = 0
        for ns in bank.namespaces():
            space = bank._spaces[ns]
            ids = bank.chunk_ids(ns)
            assert ids  # a namespace emptied (delete, eviction, an upsert's replace) is gone
            assert sorted(ids) == sorted(space.ids) and len(set(ids)) == len(ids)
            assert space.index.ntotal == len(space.ids) == space.embeddings.shape[0]
            if space.ids:  # the dense index's rows are the embeddings, in ids order (removals compact both)
                assert np.array_equal(space.index.reconstruct_n(0, space.index.ntotal), space.embeddings)
            assert set(space.lexical.slot_of) == set(space.ids)
            by_doc = {}  # the document index: each document's chunks, found without a scan
            for c in ids:
                by_doc.setdefault(bank.get(c, namespace=ns).doc_id, []).append(c)
            assert space.docs == {d: set(v) for d, v in by_doc.items()} and bank.doc_chunk_ids(ns) == by_doc
            assert bank.doc_chunk_ids(ns, doc_ids=[*by_doc, "absent"]) == by_doc and bank.num_chunks(ns) == len(ids)
            if space.ids:
                want = HashEmbedder().encode([bank.get(c, namespace=ns).text for c in space.ids])
                assert np.allclose(space.embeddings, want, atol=1e-5)  # row i is chunk ids[i]
                keys, values = bank.fetch(ids, namespace=ns)
                assert keys.shape[2] == bank.num_tokens(ns) and torch.equal(values, keys * 2)
            chunks = [bank.get(c, namespace=ns) for c in ids]
            assert bank.num_tokens(ns) == sum(c.n_tokens for c in chunks) <= CAPACITY
            assert bank.nbytes(ns) == sum(bank._sizes[c] for c in ids)
            total += bank.nbytes(ns)
            for other in NAMESPACES:
                if other != ns and ids:
                    with pytest.raises(UnknownChunkError):
                        bank.get(ids[0], namespace=other)
                    with pytest.raises(UnknownChunkError):
                        bank.fetch(ids[:1], namespace=other)
        assert total == bank.nbytes() <= MAX_BYTES
        assert len(bank) == sum(len(bank.chunk_ids(ns)) for ns in bank.namespaces()) == bank.num_chunks()


BankMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=25, deadline=None, derandomize=True,
                                         suppress_health_check=[HealthCheck.too_slow])
test_bank_state_machine = BankMachine.TestCase


class DiskBankMachine(BankMachine):
    """The same tenants on a disk bank (K-V in segment files of 600 bytes, so adds flush and compaction moves
    chunks): commits, compactions and reopenings are rules too, and a reopened bank is exactly the last commit."""

    @initialize()
    def start(self):
        self.dir = Path(tempfile.mkdtemp(prefix="bank-stateful-disk-"))
        self.bank = MemoryBank(embedder=HashEmbedder(), capacity=CAPACITY, max_bytes=MAX_BYTES, dtype=torch.float32,
                               path=self.dir / "live", segment_bytes=600)
        self.saved = None
        self.committed = None
        self.step = 0
        # mostly deltas (memlong.journal), a whole record every few commits: both paths, and deltas on deltas
        self._journal = journal.MAX_DELTAS, journal.MAX_SHARE
        journal.MAX_DELTAS, journal.MAX_SHARE = 4, 100.0

    def teardown(self):
        journal.MAX_DELTAS, journal.MAX_SHARE = self._journal
        super().teardown()

    def _on_disk(self):
        """The directory holds the manifest's files and nothing else (leftovers go at each commit)."""
        named = named_by_manifest(self.dir / "live")
        assert {p.name for p in (self.dir / "live").iterdir()} == named | {"manifest.json", ".lock"}

    def _reopens_as_committed(self):
        """Every commit (a delta or the whole record) reads back as exactly the bank that made it."""
        self.committed = snapshot(self.bank)
        self._on_disk()
        assert same(snapshot(MemoryBank.load(self.dir / "live", embedder=HashEmbedder())), self.committed)

    @rule()
    def commit(self):
        self.bank.commit()
        self._reopens_as_committed()

    @rule()
    def compact(self):
        self.bank.compact(threshold=0.7)
        self._reopens_as_committed()
        live = {cid for ns in self.bank.namespaces() for cid in self.bank.chunk_ids(ns)}
        for seg in self.bank._store.segments.values():  # every kept segment is mostly live
            assert set(seg.live) <= live and seg.live_bytes >= 0.7 * (seg.entry["bytes"] - seg.start)

    @precondition(lambda self: self.committed is not None)
    @rule()
    def load(self):  # reopen the disk bank: whatever was not committed is gone, the rest is exactly there
        self.bank = MemoryBank.load(self.dir / "live", embedder=HashEmbedder(), segment_bytes=600)
        assert same(snapshot(self.bank), self.committed)


DiskBankMachine.TestCase.settings = settings(max_examples=20, stateful_step_count=25, deadline=None, derandomize=True,
                                             suppress_health_check=[HealthCheck.too_slow])
test_disk_bank_state_machine = DiskBankMachine.TestCase
