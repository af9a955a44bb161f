"""Saving and loading the memory bank: round trips, mismatches, bad paths, and a save killed midway."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import rewrite_saved
from safetensors.torch import load_file, save

from memlong import MemLong, MemoryBank, MemoryFileError, MemoryFullError, MemoryMismatchError

ROOT = Path(__file__).resolve().parents[1]


class HashEmbedder:
    """A deterministic stand-in embedder (sha256 of the text), for tests about files rather than retrieval."""

    name = "hash-embedder"
    dim = 16

    def encode(self, texts):
        rows = [np.frombuffer(hashlib.sha256(t.encode()).digest(), dtype=np.uint8)[:16].astype(np.float32) - 127.5
                for t in texts]
        v = np.array(rows, dtype=np.float32).reshape(len(texts), self.dim)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def fill(bank, namespace, n, tokens=3, seed=0, doc_id=None):
    g = torch.Generator().manual_seed(seed)
    texts = [f"{namespace} chunk {seed}-{i} about topic {i % 5}" for i in range(n)]
    keys = [torch.randn(2, 2, tokens, 8, generator=g) for _ in texts]
    values = [torch.randn(2, 2, tokens, 8, generator=g) for _ in texts]
    spans = [(i * tokens, (i + 1) * tokens) for i in range(n)]
    meta = [{"source": f"doc-{seed}", "page": i, "tags": ["a", None, 1.5]} for i in range(n)]
    token_ids = [list(range(i, i + tokens)) for i in range(n)]
    return bank.add_chunks(texts, keys=keys, values=values, namespace=namespace, spans=spans, metadata=meta,
                           doc_id=doc_id, tokens=token_ids)


def assert_same_bank(a, b):
    assert sorted(a.namespaces()) == sorted(b.namespaces())
    for ns in a.namespaces():
        assert a.chunk_ids(ns) == b.chunk_ids(ns)
        assert np.array_equal(a._spaces[ns].embeddings, b._spaces[ns].embeddings)
        assert a._spaces[ns].ids == b._spaces[ns].ids  # faiss rows line up with the same ids
        for cid in a.chunk_ids(ns):
            x, y = a.get(cid, namespace=ns), b.get(cid, namespace=ns)
            assert (x.text, x.doc_id, x.span, x.order, x.retrievals, x.metadata, x.tokens) == \
                   (y.text, y.doc_id, y.span, y.order, y.retrievals, y.metadata, y.tokens)
            assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values) and x.keys.dtype == y.keys.dtype
    assert a.num_tokens() == b.num_tokens() and a.nbytes() == b.nbytes()


def test_round_trip_keeps_every_field(tmp_path, embedder):
    bank = MemoryBank(embedder=embedder, capacity=500, dtype=torch.bfloat16, max_bytes=10**7)
    fill(bank, "alice", 6, seed=1)
    fill(bank, "bob", 4, seed=2, doc_id="shared-doc")
    bank.delete(bank.chunk_ids("alice")[1:2], namespace="alice")  # index rows shifted by a removal
    bank.search("alice chunk about topic 3", namespace="alice", k=2)  # counters
    bank.add_chunks(["  later  "], keys=[torch.ones(2, 2, 1, 8)], values=[torch.ones(2, 2, 1, 8)], namespace="empty")
    bank.delete(bank.chunk_ids("empty"), namespace="empty")  # a namespace with no chunks left
    bank.save(tmp_path / "bank")

    loaded = MemoryBank.load(tmp_path / "bank", embedder=embedder)
    assert_same_bank(bank, loaded)
    assert (loaded.capacity, loaded.dtype, loaded.max_bytes) == (500, torch.bfloat16, 10**7)
    query = "bob chunk about topic 2"
    for mode in ("dense", "lexical", "hybrid"):  # the lexical index is rebuilt from the texts
        assert loaded.search(query, namespace="bob", count=False, mode=mode) == \
            bank.search(query, namespace="bob", count=False, mode=mode)
    # new chunks come after the loaded ones in document order
    new = fill(loaded, "alice", 1, seed=9)
    assert loaded.chunk_ids("alice")[-1] == new[0]
    # only what was asked for; options override the saved config
    part = MemoryBank.load(tmp_path / "bank", embedder=embedder, namespaces=["bob"], dtype=torch.float32)
    assert part.namespaces() == ["bob"] and part.get(part.chunk_ids("bob")[0], namespace="bob").keys.dtype == torch.float32
    with pytest.raises(MemoryFileError, match="holds"):
        MemoryBank.load(tmp_path / "bank", embedder=embedder, namespaces=["carol"])


@pytest.mark.parametrize("n_spaces", [3, 5, 9])
def test_many_namespaces_round_trip(tmp_path, n_spaces):
    """Regression: with 3+ non-empty namespaces the K-V tensors were numbered counting the embedding tensors
    of earlier namespaces, so the saved bank could never load (every tenant's data lost)."""
    bank = MemoryBank(embedder=HashEmbedder(), capacity=10_000)
    for j in range(n_spaces):
        fill(bank, f"tenant-{j}", 1 + (7 * j) % 5, tokens=1 + j % 3, seed=j, doc_id=f"doc-{j % 2}")
    bank.save(tmp_path / "bank")
    assert_same_bank(bank, MemoryBank.load(tmp_path / "bank", embedder=HashEmbedder()))
    some = [f"tenant-{j}" for j in range(0, n_spaces, 2)]
    bank.save(tmp_path / "some", namespaces=some)
    assert sorted(MemoryBank.load(tmp_path / "some", embedder=HashEmbedder()).namespaces()) == sorted(some)


def test_restore_replaces_namespaces_in_place(tmp_path):
    bank = MemoryBank(embedder=HashEmbedder(), capacity=500)
    fill(bank, "alice", 3, seed=1)
    saved_alice = bank.chunk_ids("alice")
    bank.save(tmp_path / "b", namespaces=["alice"])
    fill(bank, "alice", 2, seed=2)
    fill(bank, "bob", 2, seed=3)
    bob = bank.chunk_ids("bob")
    assert bank.restore(tmp_path / "b") == ["alice"]
    assert bank.chunk_ids("alice") == saved_alice and bank.chunk_ids("bob") == bob
    # a restore that does not fit leaves the bank as it was
    small = MemoryBank(embedder=HashEmbedder(), capacity=500, max_bytes=bank.nbytes("alice") - 1)
    with pytest.raises(MemoryFullError, match="max_bytes"):
        small.restore(tmp_path / "b")
    assert len(small) == 0


def test_a_bank_that_restored_chunks_saves_loadably(tmp_path):
    """Found by the journal's random walk: restored chunks kept their saved insertion orders, which a fresh or
    reopened bank had already given to its own chunks; the bank then saved fine and never loaded again ("order 0
    appears twice"). Restored chunks now come after this bank's own, in their saved order."""
    first = MemoryBank(embedder=HashEmbedder())
    fill(first, "alice", 3, seed=1)  # orders 0, 1, 2
    first.save(tmp_path / "alice")
    bank = MemoryBank(embedder=HashEmbedder())
    fill(bank, "bob", 2, seed=2)  # orders 0, 1 as well
    bank.restore(tmp_path / "alice")
    bank.restore(tmp_path / "alice")  # again, over itself
    orders = [bank.get(c, namespace=ns).order for ns in ("bob", "alice") for c in bank.chunk_ids(ns)]
    assert orders == sorted(set(orders))  # unique; alice's after bob's, in alice's own order
    assert bank.chunk_ids("alice") == first.chunk_ids("alice")
    bank.save(tmp_path / "both")
    assert_same_bank(bank, MemoryBank.load(tmp_path / "both", embedder=HashEmbedder()))


def test_memlong_save_and_load_memory(tmp_path, make_tiny, tiny_hf):
    ml, _ = make_tiny(chunk_size=16, local_window=64, top_k=2)
    text = " ".join(f"Line {i}: the keeper of key {i * 37 % 101} walks the hall." for i in range(20))
    ml.ingest(text, namespace="doc", progress=False)
    ids = ml.bank.search("keeper of key 22", namespace="doc", k=2)
    before = ml.generate("The keeper", namespace="doc", chunk_ids=[h.chunk_id for h in ids], max_new_tokens=8)
    ml.save_memory(tmp_path / "mem")

    fresh, _ = make_tiny(chunk_size=16, local_window=64, top_k=2)
    bank = fresh.bank
    assert fresh.load_memory(tmp_path / "mem") == ["doc"]
    assert fresh.bank is bank  # loaded in place: adapters holding the bank see the memory
    assert_same_bank(ml.bank, fresh.bank)
    after = fresh.generate("The keeper", namespace="doc", chunk_ids=[h.chunk_id for h in ids], max_new_tokens=8)
    assert after == before


def test_loading_into_another_model_or_config_names_both(tmp_path, make_tiny, tokenizer, embedder):
    from transformers import LlamaConfig, LlamaForCausalLM

    ml, _ = make_tiny(chunk_size=16, local_window=64)
    ml.ingest("A short document about lighthouses and their keepers. " * 6, namespace="doc", progress=False)
    ml.save_memory(tmp_path / "mem")

    other, _ = make_tiny(chunk_size=32, local_window=64)
    with pytest.raises(MemoryMismatchError, match=r"chunk_size: saved 16, this model 32") as err:
        other.load_memory(tmp_path / "mem")
    assert "Saved:" in str(err.value) and "This model:" in str(err.value)
    paper, _ = make_tiny(chunk_size=16, local_window=64, kv_source="memory_layer")
    with pytest.raises(MemoryMismatchError, match="kv_source: saved 'per_layer', this model 'memory_layer'"):
        paper.load_memory(tmp_path / "mem")
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4)
    wide = MemLong(LlamaForCausalLM(cfg).eval(), tokenizer, embedder=embedder)
    with pytest.raises(MemoryMismatchError, match="kv_heads: saved 2, this model 4"):
        wide.load_memory(tmp_path / "mem")
    assert len(other.bank) == len(paper.bank) == len(wide.bank) == 0  # nothing half-loaded
    with pytest.raises(MemoryMismatchError, match="hash-embedder"):
        MemoryBank.load(tmp_path / "mem", embedder=HashEmbedder())
    bare = tmp_path / "bare"
    ml.bank.save(bare)  # no fingerprint: a MemLong refuses it, a plain bank loads it
    with pytest.raises(MemoryMismatchError, match="no model fingerprint"):
        ml.load_memory(bare)
    assert len(MemoryBank.load(bare, embedder=embedder)) == len(ml.bank)


def test_an_empty_namespace_list_never_wipes_a_save_and_a_restore_over_itself_fits(tmp_path):
    """Mutation testing (session 24): nothing pinned that save(namespaces=[]) refuses to replace a saved bank with
    an empty one, or that restoring a namespace over itself does not count its bytes twice against max_bytes."""
    bank = MemoryBank(embedder=HashEmbedder())
    fill(bank, "a", 2)
    bank.save(tmp_path / "bank")
    with pytest.raises(ValueError, match=r"save\(namespaces=\[\]\) would replace the bank"):
        bank.save(tmp_path / "bank", namespaces=[])
    assert len(MemoryBank.load(tmp_path / "bank", embedder=HashEmbedder())) == 2
    tight = MemoryBank(embedder=HashEmbedder(), max_bytes=bank.nbytes() + bank.nbytes() // 2)
    tight.restore(tmp_path / "bank")
    assert tight.restore(tmp_path / "bank") == ["a"] and len(tight) == 2


def test_bad_paths_and_unsaveable_metadata(tmp_path):
    emb = HashEmbedder()
    with pytest.raises(MemoryFileError, match="no such directory"):
        MemoryBank.load(tmp_path / "nothing", embedder=emb)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MemoryFileError, match="no manifest.json"):
        MemoryBank.load(tmp_path / "empty", embedder=emb)
    for odd in ("fifo", "folder", "dangling"):  # a FIFO would block open() forever: refused by what it is
        (tmp_path / odd).mkdir()
        manifest = tmp_path / odd / "manifest.json"
        os.mkfifo(manifest) if odd == "fifo" else manifest.mkdir() if odd == "folder" else manifest.symlink_to("gone")
        with pytest.raises(MemoryFileError, match="manifest.json is not a regular file"):
            MemoryBank.load(tmp_path / odd, embedder=emb)
    bank = MemoryBank(embedder=emb)
    fill(bank, "ns", 2)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        bank.save(tmp_path / "file")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="Refusing to save"):
        bank.save(tmp_path / "home")
    assert os.listdir(tmp_path / "home") == ["notes.txt"]
    bank.save(tmp_path / "ok")
    k = torch.zeros(2, 2, 1, 8)
    with pytest.raises(ValueError, match="metadata JSON cannot store"):  # refused on the way in (issue 16, 3)
        bank.add_chunks(["odd metadata"], keys=[k], values=[k], namespace="ns", metadata=[{"when": object()}])
    assert len(bank) == 2
    bank.save(tmp_path / "ok")
    assert len(MemoryBank.load(tmp_path / "ok", embedder=emb)) == 2  # the previous save is untouched
    with pytest.raises(ValueError, match="hold no chunks"):
        bank.save(tmp_path / "ok2", namespaces=["nobody"])


# ------------------------------------------------------------------ a save killed midway
CHILD = textwrap.dedent('''
    import hashlib, json, os, sys, time
    import torch
    sys.path.insert(0, {tests!r})
    from test_persistence import HashEmbedder, fill, digest
    from memlong import MemoryBank

    path, kill_at, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    bank = MemoryBank(embedder=HashEmbedder(), capacity=10**6)
    fill(bank, "ns", 50, tokens=64, seed=0)
    bank.save(path)
    print("saved", digest(bank), flush=True)
    calls = 0
    real_fsync = os.fsync

    def fsync(fd):
        global calls
        calls += 1
        if calls == kill_at:
            print("writing", flush=True)
            time.sleep(60)
        real_fsync(fd)

    os.fsync = fsync
    for r in range(1, rounds + 1):
        fill(bank, "ns", 20, tokens=64, seed=r)
        print("saving", digest(bank), flush=True)
        bank.save(path)
        print("saved", digest(bank), flush=True)
''')


def digest(bank):
    """Everything a bank holds, as one hash."""
    h = hashlib.sha256()
    for ns in sorted(bank.namespaces()):
        for cid in bank.chunk_ids(ns):
            c = bank.get(cid, namespace=ns)
            h.update(json.dumps([ns, c.id, c.text, c.span, c.order, c.retrievals, c.metadata]).encode())
            h.update(c.keys.float().numpy().tobytes() + c.values.float().numpy().tobytes())
        h.update(bank._spaces[ns].embeddings.tobytes())
    return h.hexdigest()[:16]


def _run_child(path, kill_at, rounds, kill_after=None, delay=0.0):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=str(ROOT / "tests")), str(path), str(kill_at),
                             str(rounds)], stdout=subprocess.PIPE, text=True, env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.split())
            if kill_after is None and lines[-1][0] == "writing":
                break
            if kill_after is not None and lines[-1][0] == "saving" and len(lines) > kill_after:
                time.sleep(delay)
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    # the child kept running until the kill landed (during `delay`, it may finish a save and start the next):
    # what it printed meanwhile is still in the pipe, and the bank on disk matches the last lines, not ours
    lines += [line.split() for line in proc.stdout if line.strip()]
    assert proc.returncode == -signal.SIGKILL, lines
    return lines


@pytest.mark.parametrize("kill_at, committed", [(1, False), (2, False), (3, False), (4, True)],
                         ids=["bank-json", "tensors", "manifest-tmp", "after-rename"])
def test_killed_save_leaves_a_loadable_bank(tmp_path, kill_at, committed):
    """fsync calls of a save: 1 bank JSON, 2 tensors, 3 manifest.json.tmp, 4 the directory after the rename.
    The child freezes in the chosen fsync and is SIGKILLed: before the rename the old bank loads intact, after it
    the new one does; then the next save works and clears the leftovers."""
    lines = _run_child(tmp_path / "bank", kill_at, rounds=1)
    old, new = lines[0][1], lines[1][1]
    bank = MemoryBank.load(tmp_path / "bank", embedder=HashEmbedder())
    assert digest(bank) == (new if committed else old)
    fill(bank, "ns", 1, seed=99)
    bank.save(tmp_path / "bank")
    assert digest(MemoryBank.load(tmp_path / "bank", embedder=HashEmbedder())) == digest(bank)
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "bank").iterdir()) == [".lock", "bank", "manifest.json",
                                                                                   "tensors"]


@pytest.mark.parametrize("delay", [0.005, 0.02])
def test_save_killed_at_a_random_moment(tmp_path, delay):
    """Saves in a loop, killed while the third is under way: the bank on disk is the second or the third."""
    lines = _run_child(tmp_path / "bank", kill_at=0, rounds=10, kill_after=4, delay=delay)
    versions = [d for _, d in lines]
    assert digest(MemoryBank.load(tmp_path / "bank", embedder=HashEmbedder())) in versions[-2:]


def test_banks_saved_without_token_ids_still_load(tmp_path):
    """Token ids (kv_refresh) were added to the format later: records without them load, with ``tokens=None``."""
    bank = MemoryBank(embedder=HashEmbedder())
    fill(bank, "ns", 2)
    assert bank.get(bank.chunk_ids("ns")[0], namespace="ns").tokens == (0, 1, 2)
    bank.save(tmp_path / "bank")
    manifest = json.loads((tmp_path / "bank" / "manifest.json").read_text())
    record = json.loads((tmp_path / "bank" / manifest["files"][0]["name"]).read_text())
    for chunk in record["namespaces"][0]["chunks"]:
        del chunk["tokens"]
    rewrite_saved(tmp_path / "bank", 0, json.dumps(record).encode())
    loaded = MemoryBank.load(tmp_path / "bank", embedder=HashEmbedder())
    assert [loaded.get(c, namespace="ns").tokens for c in loaded.chunk_ids("ns")] == [None, None]
    with pytest.raises(ValueError, match="2 token ids but K-V for 3 tokens"):
        bank.add_chunks(["x"], keys=[torch.zeros(2, 2, 3, 8)], values=[torch.zeros(2, 2, 3, 8)], namespace="ns",
                        tokens=[[1, 2]])


def test_memory_made_with_another_sink_is_refused_and_older_memory_still_loads(tmp_path, make_tiny):
    """Outside-in review: memory ingested with the attention sink loaded silently into a model without one (its K-V
    attended to a token this model never sees: keys off by 0.18 at a scale of 0.56). The fingerprint now records
    the sink; memory saved before it did (no "sink_ids") still loads."""
    text = "The iron key is in the blue box. The harbour gate opens at dawn. " * 12
    with_sink, _ = make_tiny(chunk_size=16, local_window=64)
    with_sink.ingest(text, namespace="n", progress=False)
    with_sink.save_memory(tmp_path / "mem")
    without, _ = make_tiny(chunk_size=16, local_window=64, attention_sink=False)
    with pytest.raises(MemoryMismatchError, match=r"sink_ids: saved \[\d+\], this model \[\]"):
        without.load_memory(tmp_path / "mem")
    manifest = json.loads((tmp_path / "mem" / "manifest.json").read_text())
    record_file = tmp_path / "mem" / manifest["files"][0]["name"]
    record = json.loads(record_file.read_text())
    for key in ("sink_ids", "weights", "rope"):  # as saved before the keys existed
        del record["fingerprint"][key]
    data = json.dumps(record).encode()
    record_file.write_bytes(data)
    manifest["files"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (tmp_path / "mem" / "manifest.json").write_text(json.dumps(manifest))
    again, _ = make_tiny(chunk_size=16, local_window=64)
    assert again.load_memory(tmp_path / "mem") == ["n"]


def test_memory_from_other_weights_is_refused_and_the_same_weights_moved_load_quietly(tmp_path, make_tiny,
                                                                                        tokenizer, embedder):
    """Review (session 24): the fingerprint named the model and its shapes, not its weights. Memory ingested
    before a fine-tune, or by another checkpoint of the same shape saved under the same name, loaded silently
    though its K-V no longer matched the model's own; the same weights under another path warned."""
    from transformers import LlamaForCausalLM

    from memlong import MemLongConfig
    from memlong.adapter import add_lora

    ml, _ = make_tiny(chunk_size=16, local_window=64)
    ml.ingest("The iron key is in the blue box. The harbour gate opens at dawn. " * 12, namespace="n", progress=False)
    ml.save_memory(tmp_path / "mem")

    def twin(change=None):
        model = LlamaForCausalLM(ml.model.config).eval()
        model.load_state_dict(ml.model.state_dict())
        model.config.name_or_path = str(tmp_path / "elsewhere")  # moved, or saved under the same name
        if change:
            with torch.no_grad():
                change(model)
        return MemLong(model, tokenizer, MemLongConfig(chunk_size=16, local_window=64), embedder=embedder)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype in (torch.bfloat16, torch.float16):  # the same weights, rounded (diff review: float16 was refused)
            assert twin(lambda m, d=dtype: m.to(d)).load_memory(tmp_path / "mem") == ["n"]
        reader = twin(lambda m: [lora.lora_B.fill_(0.5) for lora in add_lora(m, [0, 3], rank=2, alpha=4).values()])
        assert reader.load_memory(tmp_path / "mem") == ["n"]  # LoRA kept apart: stored K-V never read it
    for layer in (0, 3):  # the first and the last source layer
        tuned = twin(lambda m, i=layer: m.model.layers[i].mlp.down_proj.weight.mul_(1.01))
        with pytest.raises(MemoryMismatchError, match=r"weights: saved \['\w+', '\w+'\], this model .* \(other weights"):
            tuned.load_memory(tmp_path / "mem")
        assert len(tuned.bank) == 0
    theta = twin(lambda m: setattr(m.config, "rope_parameters", {**m.config.rope_parameters, "rope_theta": 1234.0}))
    with pytest.raises(MemoryMismatchError, match=r"rope: saved \[10000.0, 'default', None\], this model \[1234.0"):
        theta.load_memory(tmp_path / "mem")


def test_tampered_content_with_valid_checksums_is_refused(tmp_path):
    """Checksums catch accidents; the loader also validates what the files say (fuzzed at length in
    test_persistence_fuzz.py; these are the cases it found or that matter most)."""
    bank = MemoryBank(embedder=HashEmbedder())
    fill(bank, "ns", 3)
    bank.save(tmp_path / "bank")
    manifest = json.loads((tmp_path / "bank" / "manifest.json").read_text())
    record_file = tmp_path / "bank" / manifest["files"][0]["name"]
    original = json.loads(record_file.read_text())

    def tampered(change):
        record = json.loads(json.dumps(original))
        change(record)
        data = json.dumps(record).encode()
        record_file.write_bytes(data)
        manifest["files"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        (tmp_path / "bank" / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(MemoryFileError, match="memory bank at"):
            MemoryBank.load(tmp_path / "bank", embedder=HashEmbedder())

    tampered(lambda r: r["config"].update(dtype=[]))  # found by the fuzzer: was a TypeError
    tampered(lambda r: r["config"].update(capacity=-1))
    tampered(lambda r: r["namespaces"][0]["chunks"][1].update(order=r["namespaces"][0]["chunks"][0]["order"]))
    tampered(lambda r: r["namespaces"][0]["chunks"][0].update(id="../../etc/passwd"))
    tampered(lambda r: r["namespaces"][0]["chunks"].pop())  # K-V and embeddings of a chunk no record names
    tampered(lambda r: r.update(version=2))
    tampered(lambda r: r["namespaces"][0]["chunks"][0].update(tokens=[1, 2]))  # 2 ids for K-V of 3 tokens
    tampered(lambda r: r["namespaces"][0]["chunks"][0].update(tokens=[1, -2, 3]))
    tampered(lambda r: r["namespaces"][0]["chunks"][0].update(tokens="abc"))
    manifest["files"][1]["name"] = "../outside.safetensors"
    (tmp_path / "bank" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MemoryFileError, match="malformed file entry"):
        MemoryBank.load(tmp_path / "bank", embedder=HashEmbedder())


@pytest.mark.slow
def test_demo_load_memory_reports_a_missing_directory(tmp_path, capsys):
    from memlong.cli import main

    assert main(["demo", "--load-memory", str(tmp_path / "none"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "memlong: error: --load-memory" in err and "no such directory" in err  # found before the model loads


def _legacy_copy(tmp_path: Path) -> Path:
    path = tmp_path / "first-release"
    shutil.copytree(ROOT / "tests" / "data" / "first-release-4ns", path)
    return path


def test_a_first_release_save_of_four_namespaces_loads(tmp_path, embedder):
    """The first release numbered the K-V of saves of 3+ namespaces past their chunks (tests/data/README.md): every
    chunk must come back with its own K-V (keys hold 10 * namespace + chunk), and save again in today's numbering."""
    bank = MemoryBank.load(_legacy_copy(tmp_path), embedder=embedder)
    sizes = {"alpha": 2, "beta": 1, "gamma": 3, "delta": 2}
    assert bank.namespaces() == list(sizes)
    for j, (ns, n) in enumerate(sizes.items()):
        chunks = bank.chunks(ns)
        assert [c.metadata for c in chunks] == [{"ns": ns, "i": i, "odd": ["é", None, 1.5]} for i in range(n)]
        for i, c in enumerate(chunks):
            assert c.text.startswith(f"{ns} chunk {i}:") and c.doc_id == f"{ns}-doc"
            assert torch.equal(c.keys, torch.full((2, 2, 3, 8), 10.0 * j + i, dtype=c.keys.dtype))
            assert torch.equal(c.values, -c.keys)
    hit = bank.search("the gold key of gamma", namespace="gamma", k=1)[0]
    assert bank.get(hit.chunk_id, namespace="gamma").text == "gamma chunk 2: the gold key of gamma"
    partial = MemoryBank.load(_legacy_copy(tmp_path / "p"), embedder=embedder, namespaces=["delta"])
    assert float(partial.chunks("delta")[1].keys.flatten()[0]) == 31.0
    bank.save(tmp_path / "again")
    assert_same_bank(bank, MemoryBank.load(tmp_path / "again", embedder=embedder))


def test_a_file_numbered_neither_way_is_still_refused(tmp_path, embedder):
    path = _legacy_copy(tmp_path)
    (tensor_file,) = path.glob("tensors-*.safetensors")
    tensors = load_file(tensor_file)
    tensors["k.9"], tensors["v.9"] = tensors.pop("k.8"), tensors.pop("v.8")  # the last chunk's K-V renumbered
    rewrite_saved(path, 1, save(tensors))
    with pytest.raises(MemoryFileError, match="K-V of chunk .* missing or malformed"):
        MemoryBank.load(path, embedder=embedder)


def test_big_metadata_integers_round_trip(tmp_path):
    """The first release saved metadata integers of any size; a 64-bit unsigned hash (or a UUID as an int) refused
    the whole bank later, as corrupted."""
    bank = MemoryBank(embedder=HashEmbedder())
    fill(bank, "ns", 1)
    meta = {"hash": 2**64 - 1, "low": -2**63 - 1, "nested": [uuid.UUID(int=2**128 - 7).int, -(2**4096 - 1)]}
    bank.add_chunks(["hashed"], keys=[torch.zeros(2, 2, 3, 8)], values=[torch.zeros(2, 2, 3, 8)], namespace="ns",
                    metadata=[meta])
    bank.save(tmp_path / "bank")
    loaded = MemoryBank.load(tmp_path / "bank", embedder=HashEmbedder())
    assert loaded.chunks("ns")[-1].metadata == meta
    for bad in (2**4096, -(2**5000), 10**5000):
        with pytest.raises(ValueError, match=r"an integer of \d+ bits is too large \(at most 4096 bits"):
            bank.add_chunks(["x"], keys=[torch.zeros(2, 2, 3, 8)], values=[torch.zeros(2, 2, 3, 8)], namespace="ns",
                            metadata=[{"n": bad}])
    assert len(bank.chunk_ids("ns")) == 2


def test_a_saved_config_that_is_refused_says_how_to_override(tmp_path):
    """The first release accepted evict_oldest + keep_newest > 1; the refusal names the fix, and the fix loads."""
    bank = MemoryBank(embedder=HashEmbedder())
    fill(bank, "ns", 2)
    bank.save(tmp_path / "bank")
    (record_file,) = (tmp_path / "bank").glob("bank-*.json")
    record = json.loads(record_file.read_text())
    record["config"].update(evict_oldest=0.9, keep_newest=0.5)
    rewrite_saved(tmp_path / "bank", 0, json.dumps(record).encode())
    with pytest.raises(MemoryFileError, match=r"0\.9 \+ 0\.5.*load\(\) can override capacity, .* \(e\.g\. keep_newest"):
        MemoryBank.load(tmp_path / "bank", embedder=HashEmbedder())
    assert MemoryBank.load(tmp_path / "bank", embedder=HashEmbedder(), keep_newest=0.1).keep_newest == 0.1
    # a bad override is the caller's error, not the file's (it said "its config ... is invalid (... got -1)")
    for bad, message in (({"capacity": -1}, "capacity must be a positive integer"), ({"keep_newest": 2}, "keep_newest")):
        with pytest.raises(ValueError, match=message) as caught:
            MemoryBank.load(tmp_path / "bank", embedder=HashEmbedder(), **bad)
        assert not isinstance(caught.value, MemoryFileError)
    # diff review: a combination only the caller's override breaks is the caller's too (saved evict_oldest 0.1)
    good = tmp_path / "good"
    fill(ok := MemoryBank(embedder=HashEmbedder(), dtype="float32"), "ns", 2)
    ok.save(good)
    with pytest.raises(ValueError, match="load\\(\\)'s options with the bank's saved config") as caught:
        MemoryBank.load(good, embedder=HashEmbedder(), keep_newest=0.95)
    assert not isinstance(caught.value, MemoryFileError)
    assert MemoryBank.load(good, embedder=HashEmbedder(), dtype="float32").dtype == torch.float32  # a dtype's name


def test_a_bank_refuses_an_embedder_that_is_not_one_and_takes_a_dtypes_name():
    """API review: ``MemoryBank(embedder="all-MiniLM")`` was stored and failed at the first search with "encode()
    argument 'encoding' must be str, not list"; ``dtype="float16"`` said "dtype must be one of [..., 'float16', ...],
    got 'float16'"."""
    for wrong in ("all-MiniLM", None, object()):
        with pytest.raises(TypeError, match="embedder must be a text embedder.*memlong.Embedder"):
            MemoryBank(embedder=wrong)
    assert MemoryBank(embedder=HashEmbedder(), dtype="bfloat16").dtype == torch.bfloat16
    for bad in ("float17", torch.int8):
        with pytest.raises(ValueError, match="dtype"):
            MemoryBank(embedder=HashEmbedder(), dtype=bad)


def test_k_v_that_overflow_the_loading_banks_dtype_are_refused(tmp_path):
    """A load checks each chunk's K-V once in the file's dtype and again only when it casts them: values of 1e6 saved
    in float32 are infinite in a float16 bank, which refuses them; loaded as saved, they pass."""
    bank = MemoryBank(embedder=HashEmbedder(), dtype=torch.float32)
    big = torch.full((2, 2, 3, 4), 1e6)
    bank.add_chunks(["big"], keys=[big], values=[big.clone()])
    bank.save(tmp_path / "b")
    for load in (lambda: MemoryBank.load(tmp_path / "b", embedder=HashEmbedder(), dtype=torch.float16),
                 lambda: MemoryBank(embedder=HashEmbedder(), dtype=torch.float16).restore(tmp_path / "b")):
        with pytest.raises(MemoryFileError, match="into this bank: chunk K-V hold NaN or infinite values"):
            load()
    assert torch.equal(MemoryBank.load(tmp_path / "b", embedder=HashEmbedder()).chunks("default")[0].keys, big)
