"""The bank never loses data (issue 16): whatever it accepts can be saved and loaded, bad input is refused
with the bank unchanged, hostile folders are refused, errors name only the caller's namespace."""

import hashlib
import json
import math
import os
import threading
import warnings

import numpy as np
import pytest
import torch
from test_persistence import HashEmbedder, assert_same_bank, fill

from memlong import MemoryBank, MemoryEvictionWarning, MemoryFileError, MemoryFullError, UnknownChunkError


def kv(tokens=3, value=None, layers=2, heads=2, dim=8):
    k = torch.randn(layers, heads, tokens, dim) if value is None else torch.full((layers, heads, tokens, dim), value)
    return k, k.clone()


def add(bank, text="a chunk of text", namespace="ns", **kwargs):
    k, v = kwargs.pop("kv", None) or kv()
    return bank.add_chunks([text], keys=[k], values=[v], namespace=namespace, **kwargs)


def state(bank):
    return {ns: [(c.id, c.text, c.metadata, c.span, c.doc_id) for c in map(lambda i: bank.get(i, namespace=ns),
                                                                            bank.chunk_ids(ns))]
            for ns in bank.namespaces()}, bank.nbytes(), bank.num_tokens()


def tamper(path, edit):
    """Rewrite the saved bank JSON with ``edit(text) -> text`` and fix the manifest's checksums."""
    manifest = json.loads((path / "manifest.json").read_text())
    record_file = path / manifest["files"][0]["name"]
    data = edit(record_file.read_text()).encode()
    record_file.write_bytes(data)
    manifest["files"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (path / "manifest.json").write_text(json.dumps(manifest))


# ------------------------------------------------------------------ defect 3: one validator in and out
BAD_INPUTS = [
    ("int doc_id", dict(doc_id=7), "doc_id must be a string"),
    ("negative span", dict(spans=[(-1, 2)]), "span must be"),
    ("inverted span", dict(spans=[(5, 2)]), "span must be"),
    ("negative token id", dict(tokens=[[1, -2, 3]]), "non-negative"),
    ("bool token id", dict(tokens=[[1, True, 3]]), "non-negative integers"),
    ("float token id", dict(tokens=[[1, 2.0, 3]]), "non-negative integers"),
    ("huge token id", dict(tokens=[[1, 10**30, 3]]), "non-negative integers"),
    ("zero embedding", dict(embeddings=np.zeros((1, 16))), "non-zero"),
    ("NaN embedding", dict(embeddings=np.full((1, 16), np.nan)), "finite"),
    ("NaN K-V", dict(kv=kv(value=float("nan"))), "NaN or infinite"),
    ("Inf K-V", dict(kv=kv(value=float("inf"))), "NaN or infinite"),
    ("K-V overflowing float16", dict(kv=kv(value=1e6)), "NaN or infinite"),
    ("surrogate text", dict(text="half \ud800 a pair"), "surrogate"),
    ("surrogate doc_id", dict(doc_id="d\udfff"), "surrogate"),
    ("surrogate metadata", dict(metadata=[{"k": "\ud800"}]), "JSON cannot store"),
    ("deep metadata", dict(metadata=[{"a": json.loads("[" * 40 + "]" * 40)}]), "JSON cannot store"),
    ("NaN metadata", dict(metadata=[{"score": math.nan}]), "JSON cannot store"),
    ("huge int metadata", dict(metadata=[{"n": 10**1300}]), "JSON cannot store"),
    ("non-string key", dict(metadata=[{1: "x"}]), "JSON cannot store"),
    ("empty K-V", dict(kv=kv(tokens=0)), "tokens >= 1"),
]


@pytest.mark.parametrize("name, kwargs, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_values_the_loader_would_refuse_are_refused_on_the_way_in(tmp_path, name, kwargs, message):
    bank = MemoryBank(embedder=HashEmbedder())
    fill(bank, "ns", 2)
    before = state(bank)
    text = kwargs.pop("text", "a chunk of text")
    with pytest.raises(ValueError, match=message):
        add(bank, text, **kwargs)
    assert state(bank) == before
    bank.save(tmp_path / "bank")
    assert_same_bank(bank, MemoryBank.load(tmp_path / "bank", embedder=HashEmbedder()))


def test_whatever_is_accepted_saves_and_loads(tmp_path):
    bank = MemoryBank(embedder=HashEmbedder(), dtype=torch.float32)
    add(bank, "numpy span", spans=[(np.int64(3), np.int32(6))], tokens=[np.arange(3)], doc_id="")
    add(bank, "tuple metadata", metadata=[{"t": (1, 2.5, None), "deep": json.loads("[" * 30 + "]" * 30)}])
    add(bank, "unicode ✓ text", metadata=[{"ключ": "значение", "big": 2**62}], kv=kv(value=1e30))
    bank.save(tmp_path / "bank")
    assert_same_bank(bank, MemoryBank.load(tmp_path / "bank", embedder=HashEmbedder()))


def test_mixed_kv_shapes_in_one_namespace_are_refused(tmp_path):
    bank = MemoryBank(embedder=HashEmbedder())
    add(bank, kv=kv(dim=8))
    with pytest.raises(ValueError, match="cannot join namespace 'ns'"):
        add(bank, kv=kv(dim=4))
    add(bank, namespace="other", kv=kv(dim=4))  # another namespace may use another model
    keys, _ = bank.fetch(bank.chunk_ids("ns"), namespace="ns")
    assert keys.shape == (2, 2, 3, 8)


# ------------------------------------------------------------------ defect 12: loader errors are MemoryFileError
@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('"next_order":', '"next_order":' + "9" * 5000 + ",\"x\":"), "not valid JSON"),
    (lambda t: t.replace('"retrievals":0', '"retrievals":' + "1" * 200, 1), "order or retrieval count"),
    (lambda t: t.replace('chunk 0-0', 'chunk \\ud800', 1), "surrogate"),
    (lambda t: t.replace('"tokens":[0,1,2]', '"tokens":[0,true,2]', 1), "non-negative integers"),
    (lambda t: t.replace('"tokens":[0,1,2]', '"tokens":[0,-1,2]', 1), "non-negative integers"),
    (lambda t: t.replace('"tokens":[0,1,2]', '"tokens":[0,1.5,2]', 1), "non-negative integers"),
])
def test_hostile_records_fail_as_memory_file_errors(tmp_path, edit, message):
    bank = MemoryBank(embedder=HashEmbedder())
    fill(bank, "ns", 3)
    bank.save(tmp_path / "bank")
    tamper(tmp_path / "bank", edit)
    with pytest.raises(MemoryFileError, match=message):
        MemoryBank.load(tmp_path / "bank", embedder=HashEmbedder())


def test_a_manifest_with_a_huge_integer_fails_cleanly(tmp_path):
    bank = MemoryBank(embedder=HashEmbedder())
    fill(bank, "ns", 1)
    bank.save(tmp_path / "bank")
    text = (tmp_path / "bank" / "manifest.json").read_text()
    (tmp_path / "bank" / "manifest.json").write_text(text.replace('"version": 1', '"version": ' + "7" * 5000))
    with pytest.raises(MemoryFileError, match="not valid JSON"):
        MemoryBank.load(tmp_path / "bank", embedder=HashEmbedder())


def test_mixed_kv_shapes_in_a_file_are_refused_at_load(tmp_path):
    from safetensors.torch import load_file, save_file

    bank = MemoryBank(embedder=HashEmbedder())
    fill(bank, "ns", 2)
    bank.save(tmp_path / "bank")
    manifest = json.loads((tmp_path / "bank" / "manifest.json").read_text())
    tensor_file = tmp_path / "bank" / manifest["files"][1]["name"]
    tensors = load_file(tensor_file)
    tensors["k.1"], tensors["v.1"] = (torch.zeros(2, 2, 3, 4, dtype=tensors["k.1"].dtype) for _ in range(2))
    save_file(tensors, tensor_file)
    data = tensor_file.read_bytes()
    manifest["files"][1].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (tmp_path / "bank" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MemoryFileError, match="unlike the other chunks"):
        MemoryBank.load(tmp_path / "bank", embedder=HashEmbedder())


# ------------------------------------------------------------------ defect 6: hostile folders
def test_a_fifo_lock_file_is_refused_not_waited_on(tmp_path):
    bank = MemoryBank(embedder=HashEmbedder())
    fill(bank, "ns", 1)
    bank.save(tmp_path / "bank")
    (tmp_path / "bank" / ".lock").unlink()
    os.mkfifo(tmp_path / "bank" / ".lock")
    outcome = []

    def load():
        try:
            MemoryBank.load(tmp_path / "bank", embedder=HashEmbedder())
        except Exception as exc:  # noqa: BLE001 - the outcome is checked below
            outcome.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "load() hangs on a FIFO lock file"
    assert isinstance(outcome[0], MemoryFileError) and "not a regular file" in str(outcome[0])
    with pytest.raises(MemoryFileError, match="not a regular file"):
        bank.save(tmp_path / "bank")


def test_a_symlinked_lock_file_is_refused_and_its_target_never_created(tmp_path):
    bank = MemoryBank(embedder=HashEmbedder())
    fill(bank, "ns", 1)
    (tmp_path / "bank").mkdir()
    target = tmp_path / "elsewhere" / "planted"
    (tmp_path / "elsewhere").mkdir()
    os.symlink(target, tmp_path / "bank" / ".lock")
    with pytest.raises(MemoryFileError, match="symbolic link"):
        bank.save(tmp_path / "bank")
    assert not target.exists()


def test_a_folder_named_like_a_data_file_is_refused_before_the_save(tmp_path):
    bank = MemoryBank(embedder=HashEmbedder())
    fill(bank, "ns", 2)
    bank.save(tmp_path / "bank")
    (tmp_path / "bank" / "bank-0123456789abcdef.json").mkdir()
    fill(bank, "ns", 1, seed=1)
    with pytest.raises(ValueError, match="not a regular file"):
        bank.save(tmp_path / "bank")
    assert len(MemoryBank.load(tmp_path / "bank", embedder=HashEmbedder())) == 2  # the old bank, untouched


def test_saving_no_namespaces_is_refused(tmp_path):
    bank = MemoryBank(embedder=HashEmbedder())
    fill(bank, "ns", 2)
    bank.save(tmp_path / "bank")
    with pytest.raises(ValueError, match="namespaces=None"):
        bank.save(tmp_path / "bank", namespaces=[])
    assert len(MemoryBank.load(tmp_path / "bank", embedder=HashEmbedder())) == 2


# ------------------------------------------------------------------ defect 8: settings keep namespaces bounded
@pytest.mark.parametrize("kwargs, message", [
    (dict(evict_oldest=2.0), "evict_oldest"), (dict(keep_newest=-1), "keep_newest"),
    (dict(evict_oldest=0.6, keep_newest=0.6), "at most 1"), (dict(capacity=2.5), "capacity"),
    (dict(capacity=True), "capacity"), (dict(max_bytes=True), "max_bytes"), (dict(max_bytes=1.5), "max_bytes"),
    (dict(evict_oldest="0.1"), "evict_oldest"),
])
def test_bad_bank_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MemoryBank(embedder=HashEmbedder(), **kwargs)


@pytest.mark.parametrize("evict_oldest, keep_newest", [(0.0, 0.99), (0.0, 0.0), (0.5, 0.5), (0.9, 0.0)])
def test_every_accepted_setting_keeps_a_namespace_within_capacity(evict_oldest, keep_newest):
    bank = MemoryBank(embedder=HashEmbedder(), capacity=50, evict_oldest=evict_oldest, keep_newest=keep_newest)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemoryEvictionWarning)
        for i in range(60):
            add(bank, f"chunk {i}", kv=kv(tokens=1 + i % 7))
            assert bank.num_tokens("ns") <= 50


# ------------------------------------------------------------------ defect 9: get() returns a copy
def test_changing_a_got_chunk_changes_nothing_in_the_bank():
    bank = MemoryBank(embedder=HashEmbedder())
    cid = add(bank, "alice's secret", namespace="alice", metadata=[{"tags": ["a"]}])[0]
    before = state(bank)
    chunk = bank.get(cid, namespace="alice")
    chunk.namespace, chunk.text, chunk.doc_id = "mallory", "", "x" * 10_000
    chunk.metadata["tags"].append("b")
    chunk.retrievals = 99
    assert state(bank) == before and bank.nbytes() > 0
    with pytest.raises(UnknownChunkError):
        bank.get(cid, namespace="mallory")
    assert bank.get(cid, namespace="alice").retrievals == 0


# ------------------------------------------------------------------ defect 10: nothing about other namespaces
def test_a_missing_namespace_behaves_as_an_empty_one():
    bank = MemoryBank(embedder=HashEmbedder())
    cid = add(bank, namespace="alice")[0]
    add(bank, namespace="bob")
    assert bank.delete([], namespace="bob") == bank.delete([], namespace="nobody") == 0
    assert bank.delete(doc_id="d", namespace="nobody") == 0
    messages = []
    for ns in ("bob", "nobody"):
        with pytest.raises(UnknownChunkError) as info:
            bank.delete([cid], namespace=ns)
        messages.append(str(info.value).replace(ns, "NS"))
    assert messages[0] == messages[1]
    assert len(bank.chunk_ids("alice")) == 1


def test_memory_full_errors_do_not_show_other_namespaces_bytes():
    bank = MemoryBank(embedder=HashEmbedder(), max_bytes=5000, dtype=torch.float32)
    add(bank, "alice holds a lot", namespace="alice", kv=kv(tokens=10))
    alice = bank.nbytes("alice")
    with pytest.raises(MemoryFullError) as info:
        add(bank, "bob wants more", namespace="bob", kv=kv(tokens=10))
    assert str(alice) not in str(info.value) and "alice" not in str(info.value)
    assert "bob" not in bank.namespaces()
