"""Namespaces as hard boundaries, bounded memory, and many readers beside one writer."""

import contextlib
import random
import re
import threading
import time

import numpy as np
import pytest
import torch
from helpers import meanwhile
from test_persistence import HashEmbedder

from memlong import MemoryBank, MemoryFullError, UnknownChunkError
from memlong.memory import _RWLock


def kv(tokens, value=0.0, layers=2, heads=2, dim=4):
    k = torch.full((layers, heads, tokens, dim), float(value))
    return k, -k


def snapshot(bank, namespace):
    out = []
    for cid in bank.chunk_ids(namespace):
        c = bank.get(cid, namespace=namespace)
        out.append((cid, c.text, c.retrievals, c.keys.clone(), c.values.clone()))
    return out


def same(a, b):
    return len(a) == len(b) and all(x[:3] == y[:3] and torch.equal(x[3], y[3]) and torch.equal(x[4], y[4])
                                    for x, y in zip(a, b))


# ------------------------------------------------------------------ isolation
def test_a_namespace_cannot_retrieve_fetch_delete_or_evict_anothers_chunks(tmp_path):
    # The hash embedder maps a text to one exact vector: a leak across namespaces would score 1.0 and come first.
    embedder = HashEmbedder()
    bank = MemoryBank(embedder=embedder, capacity=60, dtype=torch.float32)
    secrets_ = ["Bob's vault code is 4471.", "Bob hides the spare key under the blue pot.", "Bob's password is tulip."]
    bob = bank.add_chunks(secrets_, keys=[kv(5, 1)[0]] * 3, values=[kv(5, 1)[1]] * 3, namespace="bob", doc_id="doc-1")
    bank.search("vault code", namespace="bob", k=1)  # bob's counters, which eviction reads
    alice = bank.add_chunks(["Alice likes gardening.", "Alice keeps bees."], keys=[kv(5, 2)[0]] * 2,
                            values=[kv(5, 2)[1]] * 2, namespace="alice", doc_id="doc-1")
    before = snapshot(bank, "bob")

    # retrieve: bob's exact text, every k, with exclusions: only alice's chunks ever come back
    for query in secrets_:
        assert bank.search(query, namespace="bob", k=1, count=False)[0].score == pytest.approx(1.0)
        assert {h.chunk_id for h in bank.search(query, namespace="alice", k=100)} <= set(alice)
    assert bank.search(secrets_[0], namespace="alice", k=100, exclude=alice) == []
    assert bank.search(bank._spaces["bob"].embeddings[0], namespace="alice", k=1)[0].chunk_id in alice
    # fetch / get / delete by a stolen id: refused, with the message an id that never existed gets
    forged = "0" * 24
    for steal in (lambda cid: bank.fetch([cid], namespace="alice"), lambda cid: bank.get(cid, namespace="alice"),
                  lambda cid: bank.delete([cid], namespace="alice")):
        with pytest.raises(UnknownChunkError) as stolen:
            steal(bob[0])
        with pytest.raises(UnknownChunkError) as never:
            steal(forged)
        assert str(stolen.value).replace(bob[0], "ID") == str(never.value).replace(forged, "ID")
    with pytest.raises(UnknownChunkError):  # one stolen id spoils the whole request: nothing partial
        bank.fetch([alice[0], bob[1]], namespace="alice")
    for odd in (None, 7, bob[0].upper(), bob[0] + " "):
        with pytest.raises(UnknownChunkError):
            bank.get(odd, namespace="alice")
    # same doc id in both namespaces: deleting alice's document leaves bob's
    assert bank.delete(namespace="alice", doc_id="doc-1") == 2
    # an unknown namespace's error does not list the others
    with pytest.raises(KeyError) as err:
        bank.delete([bob[0]], namespace="mallory")
    assert "bob" not in str(err.value) and "alice" not in str(err.value)
    # evict: alice floods her namespace far past capacity; eviction stays inside it
    for i in range(40):
        bank.add_chunks([f"Alice's note {i}"], keys=[kv(5, 3)[0]], values=[kv(5, 3)[1]], namespace="alice")
        assert bank.num_tokens("alice") <= 60
    assert same(before, snapshot(bank, "bob"))
    # save one namespace: the other's text is nowhere in the files
    bank.save(tmp_path / "alice", namespaces=["alice"])
    assert not any(b"Bob" in p.read_bytes() for p in (tmp_path / "alice").iterdir())
    assert MemoryBank.load(tmp_path / "alice", embedder=embedder).namespaces() == ["alice"]


def test_byte_limit_evicts_only_the_writer_or_refuses(tmp_path):
    emb = HashEmbedder()
    one = 2 * (2 * 2 * 2 * 8 * 4) + 4 * emb.dim  # K-V + embedding of a 2-token chunk, plus its text below
    bank = MemoryBank(embedder=emb, capacity=10**6, dtype=torch.float32, max_bytes=20 * (one + 20))
    bob = [bank.add_chunks([f"bob line {i:03d}"], keys=[kv(2, i, dim=8)[0]], values=[kv(2, i, dim=8)[1]],
                           namespace="bob")[0] for i in range(10)]
    before = snapshot(bank, "bob")
    for i in range(60):  # alice writes far more than fits: her own oldest chunks make room
        bank.add_chunks([f"alice line {i:03d}"], keys=[kv(2, i, dim=8)[0]], values=[kv(2, i, dim=8)[1]],
                        namespace="alice")
        assert bank.nbytes() <= bank.max_bytes
    assert same(before, snapshot(bank, "bob")) and bank.chunk_ids("bob") == bob
    assert 0 < len(bank.chunk_ids("alice")) < 60
    assert bank.get(bank.chunk_ids("alice")[-1], namespace="alice").text == "alice line 059"
    # carol cannot fit beside the others without evicting them: refused, nothing written, nobody evicted
    essay = kv(28, dim=8)  # 7 kB: would fit an empty bank, not beside bob's 6 kB
    with pytest.raises(MemoryFullError, match="other namespaces hold"):
        bank.add_chunks(["carol's essay"], keys=[essay[0]], values=[essay[1]], namespace="carol")
    big = kv(2 * 60, dim=8)  # larger than the whole budget: told so, not blamed on the others
    with pytest.raises(MemoryFullError, match="larger than the bank's whole max_bytes"):
        bank.add_chunks(["carol's book"], keys=[big[0]], values=[big[1]], namespace="carol")
    assert "carol" not in bank.namespaces() and same(before, snapshot(bank, "bob"))
    with pytest.raises(ValueError, match="can never fit"):
        MemoryBank(embedder=emb, capacity=4).add_chunks(["long"], keys=[kv(5)[0]], values=[kv(5)[1]])
    with pytest.raises(ValueError, match="max_bytes"):
        MemoryBank(embedder=emb, max_bytes=0)


def test_memlong_config_bounds_bytes(make_tiny):
    text = " ".join(f"Sentence number {i} of a document." for i in range(20))
    ml, _ = make_tiny(chunk_size=16, local_window=64, top_k=2, memory_max_bytes=60_000)
    assert ml.bank.max_bytes == 60_000
    ml.ingest(text, namespace="d", progress=False)  # several steps of 48 tokens: eviction keeps the bank in bounds
    assert ml.bank.num_tokens("d") < len(ml.tokenize(text))
    assert 0 < ml.bank.nbytes() <= 60_000
    small, _ = make_tiny(chunk_size=16, local_window=64, top_k=2, memory_max_bytes=40_000)
    with pytest.raises(MemoryFullError, match="One write of .* larger than the bank's whole max_bytes=40000.*ingest_step"):
        small.ingest(text, namespace="d", progress=False)  # one 48-token step's K-V alone exceed the budget
    assert small.bank.num_tokens() == 0  # nothing half-written
    with pytest.raises(ValueError, match="memory_max_bytes"):
        make_tiny(memory_max_bytes=-1)


# ------------------------------------------------------------------ concurrency
def test_readers_share_the_lock_and_a_writer_waits_for_them():
    lock = _RWLock()
    both_inside = threading.Barrier(2, timeout=10)
    errors = []

    def reader():
        try:
            with lock.read():
                both_inside.wait()  # only passes if two readers hold the lock at the same time
        except threading.BrokenBarrierError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors

    events = []
    held = threading.Event()
    release = threading.Event()

    def long_reader():
        with lock.read():
            held.set()
            release.wait(10)
            events.append("reader 1 out")

    def writer():
        with lock.write():
            events.append("writer")

    def late_reader():
        with lock.read():
            events.append("reader 2")

    t1 = threading.Thread(target=long_reader)
    t1.start()
    held.wait(10)
    tw = threading.Thread(target=writer)
    tw.start()
    while not lock._writers_waiting:
        time.sleep(0.001)
    t2 = threading.Thread(target=late_reader)  # arrives while the writer waits: must not overtake it
    t2.start()
    time.sleep(0.1)
    assert events == []
    release.set()
    for t in (t1, tw, t2):
        t.join(10)
    assert events == ["reader 1 out", "writer", "reader 2"]


def test_a_writer_interrupted_while_waiting_lets_the_readers_it_held_back_in():
    """Review finding: a writer whose wait was interrupted (KeyboardInterrupt) left the readers queued behind it
    asleep until some unrelated release."""
    lock = _RWLock()
    held, release, entered = threading.Event(), threading.Event(), threading.Event()
    wait = lock._wait

    def interrupted_wait(timeout=-1):
        if threading.current_thread().name == "writer":
            wait(0.3)  # the late reader queues meanwhile
            raise KeyboardInterrupt
        return wait(timeout)

    lock._wait = interrupted_wait

    def long_reader():
        with lock.read():
            held.set()
            release.wait(10)

    def writer():
        with contextlib.suppress(KeyboardInterrupt), lock.write():
            pass

    def late_reader():
        with lock.read():
            entered.set()

    threading.Thread(target=long_reader).start()
    held.wait(10)
    tw = threading.Thread(target=writer, name="writer")
    tw.start()
    while not lock._writers_waiting:
        time.sleep(0.001)
    threading.Thread(target=late_reader).start()
    tw.join(10)
    try:
        assert entered.wait(3)  # while the first reader still holds the lock
    finally:
        release.set()


def test_bank_searches_run_while_a_reader_holds_the_lock_and_writes_wait(embedder):
    bank = MemoryBank(embedder=embedder, dtype=torch.float32)
    bank.add_chunks(["first chunk", "second chunk"], keys=[kv(2)[0]] * 2, values=[kv(2)[1]] * 2, namespace="ns")
    done = []
    with bank._lock.read():  # as if a slow reader were inside
        reader = threading.Thread(target=lambda: done.append(bank.search("first", namespace="ns", k=1)))
        writer = threading.Thread(target=lambda: done.append(
            bank.add_chunks(["third chunk"], keys=[kv(2)[0]], values=[kv(2)[1]], namespace="ns")))
        reader.start()
        reader.join(30)
        assert len(done) == 1  # the search did not wait for the other reader
        writer.start()
        time.sleep(0.3)
        assert len(done) == 1 and len(bank) == 2  # the add waits until readers leave
    writer.join(30)
    assert len(done) == 2 and len(bank) == 3


def test_eight_readers_and_one_writer_keep_every_chunk_aligned(embedder):
    """8 threads search/fetch while 1 thread adds (with evictions and deletes) for ~3 s. Every read must see a
    consistent chunk: the score faiss returns equals the query's dot product with the text's own embedding, the
    K-V are the ones written for that text, and their token count equals the span."""
    pool = [f"Record {i}: {word} number {i * 7919 % 1000} is filed under {['red', 'green', 'blue'][i % 3]}."
            for i, word in enumerate(["apple", "anchor", "bridge", "candle", "desert", "engine", "forest", "garden",
                                      "harbor", "island", "jungle", "kettle"] * 6)]
    index = {t: i for i, t in enumerate(pool)}
    vectors = embedder.encode(pool)
    tokens = [1 + i % 7 for i in range(len(pool))]
    bank = MemoryBank(embedder=embedder, capacity=120, dtype=torch.float32)
    rng = random.Random(0)
    stop = threading.Event()
    errors, reads, writes = [], [0] * 8, [0]

    def add(batch, encode):
        keys, values = zip(*[kv(tokens[i], i) for i in batch])
        spans = [(10 * i, 10 * i + tokens[i]) for i in batch]
        bank.add_chunks([pool[i] for i in batch], keys=list(keys), values=list(values), namespace="ns", spans=spans,
                        embeddings=None if encode else vectors[batch])

    def check(cid, text=None):
        chunk = bank.get(cid, namespace="ns")
        i = index[chunk.text]
        k, v = bank.fetch([cid], namespace="ns")
        assert k.shape == (2, 2, tokens[i], 4) and chunk.span[1] - chunk.span[0] == tokens[i] == chunk.n_tokens
        assert k.eq(float(i)).all() and v.eq(-float(i)).all(), f"K-V of another chunk under {chunk.text!r}"
        return i

    def writer():
        try:
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                batch = rng.sample(range(len(pool)), rng.randint(1, 4))
                add(batch, encode=rng.random() < 0.3)
                writes[0] += 1
                ids = bank.chunk_ids("ns")
                if ids and rng.random() < 0.2:
                    bank.delete([rng.choice(ids)], namespace="ns")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            stop.set()

    def reader(r):
        local = random.Random(r)
        while not stop.is_set():
            q = local.randrange(len(pool))
            try:
                hits = bank.search(vectors[q], namespace="ns", k=4)
                for hit in hits:
                    try:
                        i = check(hit.chunk_id)
                    except UnknownChunkError:
                        continue  # evicted or deleted since the search: allowed, and never half-visible
                    assert abs(hit.score - float(vectors[q] @ vectors[i])) < 1e-4, "faiss row of another chunk"
                if len(hits) > 1:  # several ids at once come back in document order
                    try:
                        k, _ = bank.fetch([h.chunk_id for h in hits], namespace="ns")
                    except UnknownChunkError:
                        continue
                    assert k.shape[2] == sum(bank.get(h.chunk_id, namespace="ns").n_tokens for h in hits)
                reads[r] += 1
            except UnknownChunkError:
                continue
            except Exception as exc:
                errors.append(exc)
                stop.set()

    add([0, 1, 2], encode=False)
    threads = [threading.Thread(target=reader, args=(r,)) for r in range(8)] + [threading.Thread(target=writer)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert not errors, errors[:3]
    assert writes[0] >= 10 and min(reads) >= 1, (writes, reads)

    space = bank._spaces["ns"]
    ids = bank.chunk_ids("ns")
    assert space.index.ntotal == len(space.ids) == len(ids) == len(bank) and set(space.ids) == set(ids)
    assert bank.num_tokens("ns") == sum(bank.get(c, namespace="ns").n_tokens for c in ids) <= 120
    for cid in ids:
        check(cid)
    assert np.allclose(space.embeddings, embedder.encode([bank.get(c, namespace="ns").text for c in space.ids]),
                       atol=1e-4)
    print(f"\nconcurrency: {writes[0]} adds, reads per reader thread {reads}, {len(ids)} chunks at the end")


def test_readers_while_memlong_ingests(make_tiny):
    """The real ingest path in one thread, 8 searching/fetching threads: the chunks written are bit for bit the
    ones a quiet ingest of the same text writes, and each chunk's text, span, K-V and embedding agree."""
    ml, _ = make_tiny(chunk_size=16, local_window=64, top_k=2)
    lines = [f"Entry {i}: the {w} of the hall is {i * 13 % 97}." for i, w in
             enumerate(["lamp", "door", "clock", "chair", "rug", "bell", "map", "key"] * 3)]
    text = " ".join(lines)
    ml.ingest(text, namespace="quiet", progress=False, doc_ids=["d"])
    done = threading.Event()
    errors, reads = [], [0] * 8
    n_src, heads, dim = len(ml.config.source_layers), ml.kv_heads, ml.head_dim

    queries = ml.bank.embedder.encode(lines)

    def reader(r):
        rng = random.Random(r)
        while not done.is_set():
            try:
                for hit in ml.bank.search(queries[rng.randrange(len(lines))], namespace="busy", k=3):
                    chunk = ml.bank.get(hit.chunk_id, namespace="busy")
                    k, _ = ml.bank.fetch([hit.chunk_id], namespace="busy")
                    assert k.shape == (n_src, heads, chunk.span[1] - chunk.span[0], dim)
                reads[r] += 1
                time.sleep(0.002)  # leave the ingest thread some of the GIL on a busy 2-core machine
            except Exception as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader, args=(r,)) for r in range(8)]
    [t.start() for t in threads]
    try:
        ml.ingest(text, namespace="busy", progress=False, doc_ids=["d"])
    finally:
        done.set()
        [t.join(60) for t in threads]
    assert not errors, errors[:3]
    assert sum(reads) > 0
    tokens = ml.tokenize(text)
    quiet, busy = ml.bank.chunk_ids("quiet"), ml.bank.chunk_ids("busy")
    assert len(quiet) == len(busy) > 5
    for q, b in zip(quiet, busy):
        cq, cb = ml.bank.get(q, namespace="quiet"), ml.bank.get(b, namespace="busy")
        assert (cq.text, cq.span) == (cb.text, cb.span)
        assert cb.text == ml.tokenizer.decode(tokens[cb.span[0]:cb.span[1]]) and cb.n_tokens == cb.span[1] - cb.span[0]
        assert torch.allclose(cq.keys, cb.keys, atol=1e-5) and torch.allclose(cq.values, cb.values, atol=1e-5)
    space = ml.bank._spaces["busy"]
    texts = [ml.bank.get(c, namespace="busy").text for c in space.ids]
    assert np.allclose(space.embeddings, ml.bank.embedder.encode(texts), atol=1e-4)
    assert re.fullmatch(r"[0-9a-f]{24}", busy[0])


def test_concurrent_generate_and_ingest_on_one_memlong_match_sequential(make_tiny):
    """MemLong keeps per-call state (attention context, stream) on the call, so inference calls from several
    threads on one instance give what they give alone; they share the model's compute (no speed-up)."""
    ml, _ = make_tiny(chunk_size=16, local_window=64, top_k=2)
    ml.ingest(" ".join(f"Fact {i}: the {w} is kept in room {i * 11 % 50}." for i, w in
                       enumerate(["sword", "crown", "ring", "scroll"] * 3)), namespace="kb", progress=False)
    prompts = ["The sword is kept in", "Room 22 holds", "Where is the ring?"]
    alone = [ml.generate(p, namespace="kb", max_new_tokens=4) for p in prompts]
    doc = " ".join(f"Another line {i} about nothing in particular." for i in range(6))
    results, errors = {}, []

    def ask(i):
        try:
            results[i] = ml.generate(prompts[i], namespace="kb", max_new_tokens=4)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    writer = threading.Thread(target=lambda: ml.ingest(doc, namespace="other", progress=False))
    [t.start() for t in [writer, *threads]]
    [t.join(120) for t in [writer, *threads]]
    assert not errors, errors
    assert [results[i] for i in range(len(prompts))] == alone
    assert len(ml.bank.chunk_ids("other")) > 0


def test_a_nested_read_passes_a_waiting_writer_and_a_write_inside_a_read_is_refused():
    """``bank.reading()`` nests the bank's own reads: a nested read must not queue behind a writer that waits for
    this very thread (a deadlock), and a write inside it would wait for itself: RuntimeError instead."""
    lock = _RWLock()
    waiting, done = threading.Event(), []

    def writer():
        waiting.set()
        with lock.write():
            done.append("writer")

    with lock.read():
        t = threading.Thread(target=writer)
        t.start()
        waiting.wait(10)
        while not lock._writers_waiting:
            time.sleep(0.001)
        with lock.read():  # nested: must not wait for the writer
            done.append("nested read")
        with pytest.raises(RuntimeError, match="inside its own"):
            with lock.write():
                pass
    t.join(10)
    assert done == ["nested read", "writer"]
    with lock.write():  # the refused write left the lock as it was
        pass


def test_read_blocks_that_end_out_of_order_or_in_another_thread_leave_the_lock_right():
    """Review finding: the first reentrant read kept one depth per thread and restored it on exit, so read blocks
    held by generators (or asyncio tasks) that ended out of order released the lock while one was still open and
    left the thread marked as reading for good (its writes raised RuntimeError ever after)."""
    lock = _RWLock()

    def holding():
        with lock.read():
            yield

    first, second = holding(), holding()
    next(first), next(second)
    first.close()  # the outer block ends first
    assert lock._readers == 1  # the inner one still holds the lock
    second.close()
    assert lock._readers == 0
    with lock.write():  # this thread reads no more
        pass
    g = holding()
    t = threading.Thread(target=next, args=(g,))  # the block begins in another thread...
    t.start()
    t.join(10)
    assert lock._readers == 1
    g.close()  # ...and ends here
    assert lock._readers == 0 and not lock._depth
    with lock.write():
        pass


def test_generate_reads_what_its_own_search_found_even_if_another_thread_deletes_it(make_tiny):
    """Review finding: ``generate`` searched, then fetched, taking the bank's lock twice; a chunk another thread
    deleted in between failed the call with UnknownChunkError (a chat service that deletes or evicts old turns).
    Here the deletion is started right after the search: it now waits until the answer's memory is read."""
    ml, _ = make_tiny(chunk_size=16, local_window=64, top_k=2)
    ml.ingest("The keeper of the iron key is Tobias Wren. The harbour gate opens at dawn.", namespace="chat",
              progress=False)
    search, threads, found = ml.bank.search, [], []

    def search_then_delete(*args, **kwargs):
        hits = search(*args, **kwargs)
        found.extend(h.chunk_id for h in hits)
        threads.append(meanwhile(lambda: ml.bank.delete([h.chunk_id for h in hits], namespace="chat")))
        return hits

    ml.bank.search = search_then_delete
    ml.generate("Who keeps the iron key?", namespace="chat", max_new_tokens=2)  # was UnknownChunkError
    del ml.bank.search
    threads[0].join(10)
    assert found and not threads[0].is_alive() and ml.bank.stored(found, namespace="chat") == []  # deleted after


def test_numerically_extreme_inputs_are_searched_right_or_refused_before_they_are_stored(tmp_path):
    """Numerics review: a query vector scaled by 1e20 or 1e-25 (float32 sums of squares overflow / underflow) ranked
    by nothing or scored ~1e-25; int8 K-V spanning +-3e38 were stored as NaN and the saved bank refused to load;
    integer K-V were stored as 0/1; a bfloat16 tensor of embeddings failed inside numpy."""
    emb = HashEmbedder()
    bank = MemoryBank(embedder=emb, dtype=torch.float32, quantization="int8")
    texts = ["red ship", "blue boat", "green tree"]
    bank.add_chunks(texts, keys=[kv(2, i)[0] for i in range(3)], values=[kv(2, i)[1] for i in range(3)])
    unit = emb.encode(["red ship"])[0]
    want = [(h.chunk_id, round(h.score, 5)) for h in bank.search(unit, k=3)]
    for scale in (1e20, 1e-25):
        assert [(h.chunk_id, round(h.score, 5)) for h in bank.search(unit * scale, k=3)] == want
    before = snapshot(bank, "default")
    huge = torch.full((2, 2, 2, 4), 3e38)
    huge[:, :, 1] = -3e38
    with pytest.raises(ValueError, match="wider than float32"):
        bank.add_chunks(["huge"], keys=[huge], values=[huge.clone()])
    with pytest.raises(ValueError, match="floating point"):
        bank.add_chunks(["ints"], keys=[torch.ones(2, 2, 2, 4, dtype=torch.int64)], values=[kv(2)[1]])
    assert same(snapshot(bank, "default"), before)
    bank.save(tmp_path / "bank")
    assert same(snapshot(MemoryBank.load(tmp_path / "bank", embedder=emb), "default"), before)
    vectors = torch.from_numpy(emb.encode(["bf16 one"])).to(torch.bfloat16)
    [cid] = bank.add_chunks(["bf16 one"], keys=[kv(2)[0]], values=[kv(2)[1]], embeddings=vectors)
    assert bank.search(vectors.float().numpy()[0], k=1)[0].chunk_id == cid
