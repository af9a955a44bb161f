"""Disk-bank commits written as deltas (memlong.journal): every commit reads back as exactly the bank that made it.

A seeded random walk over what users combine (adds, deletes, searches that bump counters, resets, restores,
capacity evictions, compactions, commits, reopenings) checks after every commit that a second bank opened from the
directory equals the first, field by field, namespaces in order; plus the policy (when a delta, when the whole
record), what a delta costs on disk, and damaged or hostile journal files."""

import hashlib
import json
import random
import warnings

import pytest
import torch
from helpers import named_by_manifest
from test_persistence import HashEmbedder, fill

from memlong import MemoryBank, MemoryEvictionWarning, MemoryFileError, journal
from memlong.storage import committed

NAMESPACES = ("alice", "bob", "carol")


def state(bank):
    """Everything a bank holds, namespaces in their order; K-V and embeddings as hashes."""
    out = []
    for ns in bank.namespaces():
        chunks = []
        for cid in bank.chunk_ids(ns):
            c = bank.get(cid, namespace=ns)
            kv = hashlib.sha256(c.keys.float().numpy().tobytes() + c.values.float().numpy().tobytes()).hexdigest()
            chunks.append((c.id, c.text, c.doc_id, c.span, c.order, c.retrievals, c.metadata, c.tokens, kv))
        out.append((ns, chunks, hashlib.sha256(bank._spaces[ns].embeddings.tobytes()).hexdigest()))
    return out


def reopen(path, **options):
    return MemoryBank.load(path, embedder=HashEmbedder(), segment_bytes=800, **options)


@pytest.mark.parametrize("seed", range(4))
def test_every_commit_reopens_as_the_bank_that_made_it(tmp_path, seed, monkeypatch):
    """Review of the first journal: the hypothesis machine mostly committed empty banks, so it could not catch a
    replay that dropped retrieval counters or appended chunks in the wrong place; this walk holds chunks."""
    monkeypatch.setattr(journal, "MAX_DELTAS", 6)
    rng = random.Random(seed)
    path = tmp_path / "bank"
    bank = MemoryBank(embedder=HashEmbedder(), path=path, segment_bytes=800, capacity=120, dtype=torch.float32)
    saved = tmp_path / "saved"
    kinds = {"delta": 0, "whole": 0}
    for step in range(120):
        ns = rng.choice(NAMESPACES)
        op = rng.choices(["add", "delete", "doc", "search", "reset", "restore", "compact", "commit", "reopen"],
                         [6, 2, 1, 4, 1, 1, 1, 5, 1])[0]
        ids = bank.chunk_ids(ns) if ns in bank.namespaces() else []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MemoryEvictionWarning)  # capacity 120 tokens: adds evict
            if op == "add":
                fill(bank, ns, rng.randint(1, 4), tokens=rng.randint(2, 9), seed=1000 * seed + step,
                     doc_id=rng.choice(["d1", "d2", None]))
            elif op == "delete" and ids:
                bank.delete(rng.sample(ids, rng.randint(1, min(3, len(ids)))), namespace=ns)
            elif op == "doc":
                bank.delete(namespace=ns, doc_id=rng.choice(["d1", "d2"]))
            elif op == "search" and ids:
                bank.search(f"{ns} chunk topic {rng.randint(0, 4)}", namespace=ns, k=rng.randint(1, 4))
            elif op == "reset":
                bank.reset(ns if rng.random() < 0.8 else None)
            elif op == "restore" and saved.exists():  # replaces a namespace with new objects of the same ids
                names = MemoryBank.load(saved, embedder=HashEmbedder()).namespaces()
                bank.restore(saved, namespaces=[rng.choice(names)])
            elif op == "compact":
                bank.compact(threshold=0.8)
            elif op in ("commit", "reopen"):
                bank.commit()
                kinds["delta" if committed(path).startswith("delta-") else "whole"] += 1
                assert state(reopen(path)) == state(bank), f"seed {seed} step {step}"
                assert {p.name for p in path.iterdir()} == named_by_manifest(path) | {"manifest.json", ".lock"}
                manifest = json.loads((path / "manifest.json").read_text())
                assert len(manifest.get("journal", [])) <= journal.MAX_DELTAS
                if op == "reopen":  # go on from the files: the next delta compares with what they hold
                    bank = reopen(path)
                if rng.random() < 0.3 and bank.namespaces():
                    bank.save(saved)
    assert kinds["delta"] >= 5 and kinds["whole"] >= 2, kinds  # both paths ran, deltas on deltas


def test_a_commit_of_one_chunk_writes_a_delta_of_that_chunk(tmp_path):
    """The point of the journal: committing one chunk into a bank of many writes about one chunk's worth."""
    bank = MemoryBank(embedder=HashEmbedder(), path=tmp_path / "b", dtype=torch.float32)
    for seed in range(10):
        fill(bank, "ns", 50, seed=seed)
    bank.commit()
    whole = json.loads((tmp_path / "b" / "manifest.json").read_text())["files"]
    fill(bank, "ns", 1, seed=99)
    bank.commit()
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["version"] == 3 and manifest["files"] == whole and len(manifest["journal"]) == 1
    delta = manifest["journal"][0]
    assert delta["changes"] == 1 and delta["record"]["bytes"] < whole[0]["bytes"] / 50
    bank.search("ns chunk 99-0", namespace="ns", k=3)  # three retrieval counters
    bank.delete(bank.chunk_ids("ns")[:2], namespace="ns")
    bank.commit()
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["journal"][1]["changes"] == 5
    assert state(reopen(tmp_path / "b")) == state(bank)


def test_the_whole_record_is_written_again_when_the_journal_grows(tmp_path, monkeypatch):
    """After MAX_DELTAS deltas, or changes past MAX_SHARE of the bank, a commit writes the whole record and the
    deltas' files go."""
    monkeypatch.setattr(journal, "MAX_DELTAS", 3)
    bank = MemoryBank(embedder=HashEmbedder(), path=tmp_path / "b", dtype=torch.float32)
    fill(bank, "ns", 20)

    def journal_length():
        return len(json.loads((tmp_path / "b" / "manifest.json").read_text()).get("journal", []))

    lengths = []
    for seed in range(5):
        bank.commit()
        lengths.append(journal_length())
        fill(bank, "ns", 1, seed=seed + 1)
    assert lengths == [0, 1, 2, 3, 0]
    bank.commit()  # 25 chunks, a delta of 1
    fill(bank, "ns", 11, seed=50)  # 1 + 11 changes, not over half of 36 chunks: a delta
    bank.commit()
    assert journal_length() == 2
    fill(bank, "ns", 13, seed=60)  # 12 + 13 changes, over half of 49 chunks: the whole record
    bank.commit()
    assert journal_length() == 0
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith("delta-")]
    assert state(reopen(tmp_path / "b")) == state(bank)


def test_a_reopened_bank_evicting_to_a_smaller_capacity_commits_the_eviction(tmp_path, monkeypatch):
    """The chunks a smaller capacity evicts at reopen are in the files the next delta compares with: it removes
    them (else they came back at every reopen)."""
    monkeypatch.setattr(journal, "MAX_SHARE", 10.0)  # a delta even though most of the bank goes
    bank = MemoryBank(embedder=HashEmbedder(), path=tmp_path / "b", dtype=torch.float32, capacity=1000)
    for seed in range(4):
        fill(bank, "ns", 10, seed=seed)
    bank.commit()
    with pytest.warns(MemoryEvictionWarning, match="capacity=105 tokens on load \\(it was saved larger\\)"):
        small = reopen(tmp_path / "b", capacity=105)  # 40 chunks of 3 tokens: the paper's rule evicts 23
    evicted = 40 - len(small)
    fill(small, "ns", 1, seed=9)
    small.commit()
    assert 0 < evicted and json.loads((tmp_path / "b" / "manifest.json").read_text())["journal"][0]["changes"] == (
        evicted + 1)
    assert state(reopen(tmp_path / "b")) == state(small)


def _journal_bank(tmp_path):
    bank = MemoryBank(embedder=HashEmbedder(), path=tmp_path / "b", dtype=torch.float32)
    fill(bank, "ns", 8)
    bank.commit()
    fill(bank, "ns", 2, seed=3)
    bank.commit()
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    return manifest, tmp_path / "b" / manifest["journal"][0]["record"]["name"]


def _rewrite(tmp_path, manifest, file, change):
    """Replace the delta record with ``change`` and fix its manifest entry (a file that passes the checksums)."""
    data = json.dumps(change).encode()
    file.write_bytes(data)
    manifest["journal"][0]["record"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_a_damaged_delta_is_a_clear_error(tmp_path, damage):
    manifest, file = _journal_bank(tmp_path)
    data = file.read_bytes()
    if damage == "flip":
        file.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])
    elif damage == "truncate":
        file.write_bytes(data[:-5])
    else:
        file.unlink()
    with pytest.raises(MemoryFileError, match=file.name):
        reopen(tmp_path / "b")


@pytest.mark.parametrize("edit, problem", [
    (lambda d: d.update(removed=["no-such-chunk"]), "does not hold"),
    (lambda d: d.update(retrievals={"x": "3"}), "retrieval counters"),
    (lambda d: d.update(order=["ns", "ns"]), "order"),
    (lambda d: d.update(order=[]), "order"),
    (lambda d: d.update(added=[{"name": "ns", "chunks": [{"id": 5}]}]), "malformed"),
    (lambda d: d.update(added=[{"name": "ns", "chunks": []}]), "missing or not"),
    (lambda d: d["added"][0]["chunks"][0].update(order=-1), "order"),
    (lambda d: d.update(removed=None), "removed ids"),
    (lambda d: d.update(embedder="x"), "dimension"),
])
def test_a_hostile_delta_that_passes_its_checksum_is_refused_by_name(tmp_path, edit, problem):
    """A delta edited by hand (sizes and sha256 fixed up) is checked like a whole record: MemoryFileError naming the
    problem, never a KeyError or TypeError from inside the replay."""
    manifest, file = _journal_bank(tmp_path)
    change = json.loads(file.read_text())
    edit(change)
    _rewrite(tmp_path, manifest, file, change)
    with pytest.raises(MemoryFileError, match=problem):
        reopen(tmp_path / "b")


def test_a_delta_that_removes_a_chunk_and_counts_it_is_refused_by_name(tmp_path):
    """Adversarial review: an id both removed and given a counter (or a segment) raised a raw KeyError."""
    manifest, file = _journal_bank(tmp_path)
    base = json.loads((tmp_path / "b" / manifest["files"][0]["name"]).read_text())
    victim = base["namespaces"][0]["chunks"][0]["id"]
    for field, value in (("retrievals", 3), ("segments", base["namespaces"][0]["chunks"][0]["segment"])):
        change = json.loads(file.read_text())
        change.update(removed=[victim], **{field: {victim: value}})
        _rewrite(tmp_path, manifest, file, change)
        with pytest.raises(MemoryFileError, match=f"{file.name} does not apply .* names chunk '{victim}'"):
            reopen(tmp_path / "b")


def test_a_delta_of_another_embedding_dtype_or_a_record_claiming_a_journal_is_refused(tmp_path):
    """Adversarial review: float16 embeddings in a delta were joined (rounded) silently; a "journal" key written
    into the whole record by hand was trusted for the journal's counts (a KeyError, or MAX_DELTAS disabled)."""
    from safetensors.torch import load_file, save_file

    manifest, file = _journal_bank(tmp_path)
    tensor_file = tmp_path / "b" / manifest["journal"][0]["tensors"]["name"]
    save_file({k: t.half() for k, t in load_file(tensor_file).items()}, tensor_file)
    data = tensor_file.read_bytes()
    manifest["journal"][0]["tensors"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MemoryFileError, match="float32"):
        reopen(tmp_path / "b")
    bank = MemoryBank(embedder=HashEmbedder(), path=tmp_path / "c", dtype=torch.float32)
    fill(bank, "ns", 4)
    bank.commit()
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    record_file = tmp_path / "c" / manifest["files"][0]["name"]
    record = json.loads(record_file.read_text())
    record["journal"] = {"deltas": -10**9, "changes": 0}
    data = json.dumps(record).encode()
    record_file.write_bytes(data)
    manifest["files"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    assert reopen(tmp_path / "c")._store.journal == (0, 0)


def test_replaying_a_compaction_costs_about_one_pass(tmp_path, monkeypatch):
    """Adversarial review: the replay looked up each changed counter or segment by scanning its namespace, so a
    delta moving 40 % of 20,000 chunks (a compaction) reopened in 13 s instead of 2 s. Counted here, not timed:
    the chunk records the replay reads while applying a delta that changes every chunk's counter."""
    monkeypatch.setattr(journal, "MAX_SHARE", 10.0)
    bank = MemoryBank(embedder=HashEmbedder(), path=tmp_path / "b", dtype=torch.float32)
    fill(bank, "ns", 400)
    bank.commit()
    bank.mark_retrieved(bank.chunk_ids("ns"), namespace="ns")
    bank.commit()
    reads, applying = 0, False

    class Counting(dict):
        def __getitem__(self, key):
            nonlocal reads
            reads += applying
            return super().__getitem__(key)

    add, apply = journal.Replay._add, journal.Replay.apply

    def counting_add(self, items, tensors, what):
        add(self, [{**s, "chunks": [Counting(c) for c in s["chunks"]]} for s in items]
            if isinstance(items, list) else items, tensors, what)

    def counting_apply(self, change, added):
        nonlocal applying
        applying = True
        try:
            apply(self, change, added)
        finally:
            applying = False

    monkeypatch.setattr(journal.Replay, "_add", counting_add)
    monkeypatch.setattr(journal.Replay, "apply", counting_apply)
    assert state(reopen(tmp_path / "b")) == state(bank)
    assert reads < 5 * 400  # a scan of the namespace per changed chunk read about 400 * 400 records


def test_a_newer_format_asks_for_a_newer_memlong(tmp_path):
    manifest, _ = _journal_bank(tmp_path)
    manifest["version"] = 4
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MemoryFileError, match="version 4 is not supported .* upgrade memlong"):
        reopen(tmp_path / "b")


def test_a_disk_bank_reopens_with_the_segment_size_it_was_made_with(tmp_path):
    """Second diff review: segment_bytes was not saved, so a bank of 20 kB segments reopened with the 64 MiB
    default; its segments then counted as mid-sized and the next one-chunk commit merged the whole bank into one
    file (and wrote the whole record)."""
    bank = MemoryBank(embedder=HashEmbedder(), path=tmp_path / "b", dtype=torch.float32, segment_bytes=20_000)
    for seed in range(20):
        fill(bank, "ns", 25, tokens=3, seed=seed)  # ~23 kB per add: a full segment each
    bank.commit()
    before = sorted(p.name for p in (tmp_path / "b").glob("seg-*"))
    again = MemoryBank.load(tmp_path / "b", embedder=HashEmbedder())
    assert again._store.segment_bytes == 20_000
    fill(again, "ns", 1, seed=99)
    again.commit()
    assert set(before) <= {p.name for p in (tmp_path / "b").glob("seg-*")} and committed(tmp_path / "b").startswith("delta-")
    assert MemoryBank.load(tmp_path / "b", embedder=HashEmbedder(), segment_bytes=1 << 20)._store.segment_bytes == 1 << 20


def test_a_file_name_with_a_trailing_newline_is_refused(tmp_path):
    """Filesystem review: names were checked with ^...$, and $ also matches before a final newline, so a manifest
    naming 'seg-<id>.safetensors\\n' (a file renamed to match) loaded, and the next commit kept the odd file."""
    from memlong.records import CHUNK_ID
    from memlong.storage import _DATA_NAME, _DELTA_NAME, _OURS, SEGMENT_NAME

    for pattern, name in [(SEGMENT_NAME, "seg-0123456789abcdef.safetensors"), (_OURS, "manifest.json.tmp"),
                          (_DATA_NAME, "bank-0123456789abcdef.json"), (_DELTA_NAME, "delta-0123456789abcdef.json"),
                          (CHUNK_ID, "0123456789abcdef01234567")]:
        assert pattern.match(name) and not pattern.match(name + "\n")
