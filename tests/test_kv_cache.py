"""The device cache above the bank (issue 21, ``memory_device="auto"``): it never changes what is read.

A stateful property test reads random chunk sets through the cache while chunks are added, replaced (upserts),
deleted, evicted, reset and restored from files, and checks after every read that the cache returns exactly what
``MemoryBank.fetch`` returns, and after every step that it stays within its byte budget. The GPU is where it
pays (docs/benchmarks-gpu.md); here the cache device is the CPU, which runs every code path.
"""

import shutil
import tempfile
import warnings
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from test_persistence import HashEmbedder

from memlong import MemLongConfig, MemoryBank, MemoryEvictionWarning, UnknownChunkError
from memlong.kv_cache import DeviceCache

NAMESPACES = ("alice", "bob", "carol")
LAYERS, HEADS, DIM = 2, 2, 4
CHUNK_BYTES = 2 * LAYERS * HEADS * DIM * 4  # one token's K-V in float32


def add(bank, ns, sizes, doc="d", replace=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    kv = [torch.randn(LAYERS, HEADS, n, DIM, generator=g) for n in sizes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemoryEvictionWarning)
        return bank.add_chunks([f"{ns} {doc} {seed}-{i}" for i in range(len(sizes))], keys=kv,
                               values=[-k for k in kv], namespace=ns, doc_id=doc, replace=replace)


class CacheMachine(RuleBasedStateMachine):
    """One bank, one cache (budget: a few chunks), three namespaces."""

    @initialize(quantization=st.sampled_from(["none", "int8"]), budget=st.integers(1, 40))
    def start(self, quantization, budget):
        self.dir = Path(tempfile.mkdtemp(prefix="kv-cache-"))
        self.bank = MemoryBank(embedder=HashEmbedder(), capacity=40, dtype=torch.float32, quantization=quantization)
        self.cache = DeviceCache("cpu", budget * CHUNK_BYTES)
        self.seed = 0

    def teardown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(ns=st.sampled_from(NAMESPACES), sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4),
          doc=st.sampled_from(["d1", "d2"]), upsert=st.booleans())
    def write(self, ns, sizes, doc, upsert):
        self.seed += 1
        old = [c for c in self.bank.chunk_ids(ns) if self.bank.get(c, namespace=ns).doc_id == doc] if upsert else []
        add(self.bank, ns, sizes, doc, replace=old, seed=self.seed)

    @rule(ns=st.sampled_from(NAMESPACES), data=st.data())
    def delete(self, ns, data):
        ids = self.bank.chunk_ids(ns)
        if ids:
            self.bank.delete(data.draw(st.lists(st.sampled_from(ids), unique=True, max_size=3)), namespace=ns)

    @rule(ns=st.one_of(st.none(), st.sampled_from(NAMESPACES)))
    def reset(self, ns):
        self.bank.reset(ns)

    @rule()
    def save_and_restore(self):
        self.bank.save(self.dir / "bank")
        self.bank.restore(self.dir / "bank")  # every chunk comes back as a new payload

    @rule(ns=st.sampled_from(NAMESPACES), data=st.data(), dtype=st.sampled_from([None, torch.float16]))
    def read(self, ns, data, dtype):
        ids = self.bank.chunk_ids(ns)
        if not ids:
            with pytest.raises((UnknownChunkError, KeyError)):
                self.cache.fetch(self.bank, ["nope"], ns)
            return
        pick = data.draw(st.lists(st.sampled_from(ids), min_size=1, max_size=6))
        keys, values = self.cache.fetch(self.bank, pick, ns, dtype=dtype)
        want_k, want_v = self.bank.fetch(pick, namespace=ns, dtype=dtype)
        assert keys.dtype == want_k.dtype and torch.equal(keys, want_k) and torch.equal(values, want_v)
        keys.add_(1.0)  # callers may write to what they get: the cached copy must not change
        again, _ = self.cache.fetch(self.bank, pick, ns, dtype=dtype)
        assert torch.equal(again, want_k)

    @invariant()
    def within_budget(self):
        if hasattr(self, "cache"):
            assert self.cache.nbytes <= self.cache.max_bytes
            assert self.cache.nbytes == sum(e.nbytes for e in self.cache._entries.values())


CacheMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=30, deadline=None, derandomize=True,
                                          suppress_health_check=[HealthCheck.too_slow])
TestCacheMachine = CacheMachine.TestCase


def test_least_recently_read_chunks_leave_first_and_hits_are_counted():
    bank = MemoryBank(embedder=HashEmbedder(), capacity=100, dtype=torch.float32)
    a, b, c = add(bank, "ns", [4, 4, 4])
    cache = DeviceCache("cpu", 2 * 4 * CHUNK_BYTES)  # two chunks of 4 tokens
    cache.fetch(bank, [a, b], "ns")
    assert (cache.hits, cache.misses, len(cache)) == (0, 2, 2)
    cache.fetch(bank, [a], "ns")  # a is now the most recently read
    cache.fetch(bank, [c], "ns")  # over budget: b goes
    assert (cache.hits, cache.misses) == (1, 3)
    assert {k[1] for k in cache._entries} == {a, c}
    cache.fetch(bank, [a, c], "ns")
    assert cache.hits == 3
    cache.clear()
    assert (len(cache), cache.nbytes, cache.hits, cache.misses) == (0, 0, 0, 0)


def test_a_read_larger_than_the_budget_is_still_exact():
    bank = MemoryBank(embedder=HashEmbedder(), capacity=100, dtype=torch.float32)
    ids = add(bank, "ns", [5, 5, 5])
    cache = DeviceCache("cpu", 5 * CHUNK_BYTES)
    keys, values = cache.fetch(bank, ids, "ns")
    want = bank.fetch(ids, namespace="ns")
    assert torch.equal(keys, want[0]) and torch.equal(values, want[1])
    assert cache.nbytes <= cache.max_bytes and len(cache) == 1
    # the read keeps its first chunk rather than thrashing: read again, that chunk is a hit
    keys, _ = cache.fetch(bank, ids, "ns")
    assert torch.equal(keys, want[0]) and (cache.hits, cache.misses) == (1, 5)
    assert [k[1] for k in cache._entries] == ids[:1]


def test_a_replaced_chunk_is_never_served_stale():
    bank = MemoryBank(embedder=HashEmbedder(), capacity=100, dtype=torch.float32)
    (a,) = add(bank, "ns", [3], seed=1)
    cache = DeviceCache("cpu", 1 << 20)
    first, _ = cache.fetch(bank, [a], "ns")
    bank.reset("ns")
    (b,) = add(bank, "ns", [3], seed=2)  # new K-V; compare by content, whatever the id
    second, _ = cache.fetch(bank, [b], "ns")
    assert torch.equal(second, bank.fetch([b], namespace="ns")[0]) and not torch.equal(first, second)
    with pytest.raises(UnknownChunkError):
        cache.fetch(bank, [a], "ns")


def test_an_entry_is_used_only_while_the_bank_holds_the_payload_it_was_copied_from():
    # Chunk ids are fresh random ids, so the public API never gives an old id new K-V; the guard is for banks
    # whose payloads are swapped under the cache (another bank object, files from another lineage). White box:
    from memlong.kv_payload import DenseKV

    bank = MemoryBank(embedder=HashEmbedder(), capacity=100, dtype=torch.float32)
    (a,) = add(bank, "ns", [3])
    cache = DeviceCache("cpu", 1 << 20)
    cache.fetch(bank, [a], "ns")
    k = torch.randn(LAYERS, HEADS, 3, DIM)
    bank._chunks[a].kv = DenseKV(k, -k)
    keys, values = cache.fetch(bank, [a], "ns")
    assert torch.equal(keys, k) and torch.equal(values, -k) and cache.misses == 2


def test_bad_budget_and_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="max_bytes"):
        DeviceCache("cpu", 0)
    bad = [(dict(memory_cache_bytes=-1), "memory_cache_bytes must be"),
           (dict(memory_cache_bytes=2.5), "memory_cache_bytes must be"),
           (dict(memory_device="model", memory_cache_bytes=1 << 20), "memory_device='model' puts the whole bank"),
           (dict(memory_device="gpu"), "memory_device must be 'auto', 'cpu'"),
           (dict(memory_device="pinned", memory_path="/tmp/x"), "use memory_device='auto' or 'cpu'")]
    for fields, message in bad:
        with pytest.raises(ValueError, match=message):
            MemLongConfig(**fields).resolve(4)
    MemLongConfig(memory_device="model", memory_cache_bytes=0).resolve(4)  # 0 is off: allowed everywhere
    MemLongConfig(memory_path="/tmp/x").resolve(4)  # "auto" keeps a disk bank on the CPU


def test_auto_is_plain_cpu_memory_without_a_cache_on_a_cpu_model(make_tiny):
    ml, _ = make_tiny()
    assert ml.config.memory_device == "auto" and ml.kv_cache is None
    assert ml.bank.device.type == "cpu" and not ml.bank.pin_memory


def test_generation_through_the_cache_equals_generation_without_it(make_tiny):
    text = "The lighthouse keeper of the northern cape is named Arvid and he keeps forty lamps. " * 12
    plain, _ = make_tiny(chunk_size=16, local_window=64, top_k=3)
    plain.ingest(text, namespace="d")
    cached, _ = make_tiny(chunk_size=16, local_window=64, top_k=3, memory_cache_bytes=1 << 20)
    cached.bank = plain.bank  # the same stored K-V, read through the cache
    assert cached.kv_cache is not None
    for _ in range(2):  # a cold read, then a warm one
        want = plain.generate("Who keeps the lamps?", namespace="d", max_new_tokens=6)
        got = cached.generate("Who keeps the lamps?", namespace="d", max_new_tokens=6)
        assert got == want
    assert (cached.kv_cache.misses, cached.kv_cache.hits) == (3, 3)  # the second question copied nothing
    ids = plain.bank.chunk_ids("d")
    assert torch.equal(cached.memory_for(ids, "d")[1], plain.memory_for(ids, "d")[1])
