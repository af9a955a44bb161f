"""Fuzzing the loader for a bounded time (MEMLONG_FUZZ_SECONDS, default 30 in all).

Corrupted, truncated, deleted and swapped files, and files whose *content* is changed with their checksums
recomputed (so that the loader's own validation, not the checksum, has to catch it), must end in either
:class:`MemoryFileError` or a bank that still works — never another exception, a hang or a crash.
"""

import hashlib
import json
import os
import shutil
import struct
import threading
import time
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_persistence import HashEmbedder, digest, fill

from memlong import MemoryBank, MemoryFileError, MemoryFullError

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The memory bank at")]  # fuzzed model names warn

BUDGET = float(os.environ.get("MEMLONG_FUZZ_SECONDS", "30")) / 4  # four fuzzers share the budget
FINGERPRINT = {"architecture": "llama", "num_layers": 4, "kv_heads": 2, "head_dim": 8, "source_layers": [0, 1],
               "kv_source": "per_layer", "chunk_size": 3, "model": "tiny"}
SETTINGS = settings(max_examples=40, deadline=None, database=None, derandomize=False,
                    suppress_health_check=list(HealthCheck))


class OtherEmbedder(HashEmbedder):
    name = "other-embedder"


def _save(path, embedder, seed):
    bank = MemoryBank(embedder=embedder, capacity=1000, dtype=torch.float16, max_bytes=10**6)
    fill(bank, "alice", 4, seed=seed)
    fill(bank, "bob", 2, seed=seed + 1)
    bank.search("alice chunk", namespace="alice", k=2)
    bank.save(path, fingerprint=FINGERPRINT)
    return bank, {p.name: p.read_bytes() for p in path.iterdir() if p.name != ".lock"}


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    bank, files = _save(root / "a", HashEmbedder(), 1)
    _, other = _save(root / "b", HashEmbedder(), 7)
    return bank, files, other


def names(files):
    manifest = json.loads(files["manifest.json"])
    return manifest["files"][0]["name"], manifest["files"][1]["name"]


def rehash(files):
    """Recompute the manifest's sizes and checksums, so only the loader's validation can notice a change."""
    manifest = json.loads(files["manifest.json"])
    for entry in manifest["files"]:
        data = files.get(entry["name"], b"")
        entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    files["manifest.json"] = json.dumps(manifest).encode()


def write(path, files):
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    for name, data in files.items():
        (path / name).write_bytes(data)


def load_within(path, seconds=20.0, **kwargs):
    out = {}

    def run():
        try:
            out["bank"] = MemoryBank.load(path, embedder=kwargs.pop("embedder", HashEmbedder()), **kwargs)
        except BaseException as exc:  # noqa: B036 - everything is judged below
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "load() hung"
    return out


OUTCOMES: Counter = Counter()  # (test, outcome) -> examples; printed with -s for the README table


def judge(out, original=None):
    """MemoryFileError, or a bank that works (and equals the original when ``original`` is given)."""
    OUTCOMES[(os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0],
              type(out["error"]).__name__ if "error" in out else "loaded")] += 1
    if "error" in out:
        assert isinstance(out["error"], MemoryFileError), repr(out["error"])
        assert "memory bank at" in str(out["error"]), str(out["error"])  # every message names the directory
        return "error"
    bank = out["bank"]
    if original is not None:
        assert digest(bank) == digest(original)
    for ns in bank.namespaces():  # everything loaded is usable and aligned
        space = bank._spaces[ns]
        assert space.index.ntotal == len(space.ids) == len(bank.chunk_ids(ns))
        for cid in bank.chunk_ids(ns):
            k, v = bank.fetch([cid], namespace=ns)
            assert k.shape == v.shape and k.dim() == 4
        if space.ids:
            bank.search(space.embeddings[0], namespace=ns, k=3)
    try:
        bank.add_chunks(["after load"], keys=[torch.zeros(2, 2, 1, 8)], values=[torch.zeros(2, 2, 1, 8)], namespace="x")
    except MemoryFullError:  # a changed (but consistent) max_bytes may leave no room: a clear error is fine
        pass
    return "loaded"


def run_for(budget, fuzz):
    """Run a hypothesis test repeatedly (fresh random examples each time) until ``budget`` seconds are used."""
    end, rounds = time.monotonic() + budget, 0
    while rounds == 0 or time.monotonic() < end:
        fuzz()
        rounds += 1
    print("\n" + "\n".join(f"fuzz {test} {outcome}: {n}" for (test, outcome), n in sorted(OUTCOMES.items())))
    return rounds


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def mutate_json(data, value):
    """Replace, delete or duplicate one node of a parsed JSON document, chosen by ``data``."""
    node, parent, key = value, None, None
    while isinstance(node, (dict, list)) and node and data.draw(st.booleans()):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        parent, key = node, data.draw(st.sampled_from(keys))
        node = node[key]
    op = data.draw(st.sampled_from(["replace", "delete", "duplicate"]))
    if parent is None:
        return data.draw(json_values)
    if op == "delete":
        del parent[key]
    elif op == "duplicate" and isinstance(parent, list):
        parent.insert(key, parent[key])
    else:
        parent[key] = data.draw(json_values)
    return value


def test_corrupted_or_truncated_files_fail_cleanly(originals, tmp_path):
    bank, files, other = originals
    path = tmp_path / "bank"

    @SETTINGS
    @given(data=st.data())
    def fuzz(data):
        mutated = dict(files)
        name = data.draw(st.sampled_from(sorted(files)))
        raw = mutated[name]
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete-range", "garbage", "missing",
                                          "swap-from-other-bank", "stray-file"]))
        at = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if kind == "flip":
            bit = 1 << data.draw(st.integers(0, 7))
            mutated[name] = raw[:at] + bytes([raw[at] ^ bit]) + raw[at + 1:]
        elif kind == "truncate":
            mutated[name] = raw[:at]
        elif kind == "insert":
            mutated[name] = raw[:at] + data.draw(st.binary(min_size=1, max_size=16)) + raw[at:]
        elif kind == "delete-range":
            mutated[name] = raw[:at] + raw[at + data.draw(st.integers(1, 64)):]
        elif kind == "garbage":
            mutated[name] = data.draw(st.binary(max_size=256))
        elif kind == "missing":
            del mutated[name]
        elif kind == "swap-from-other-bank":
            mutated = {**files, **{n: b for n, b in other.items() if n != "manifest.json"}}
            mutated.update({n: other[o] for n, o in zip(names(files), names(other))})
        else:
            mutated["notes.txt"] = b"a file someone left here"
        write(path, mutated)
        outcome = judge(load_within(path), original=bank)
        if kind in ("flip", "truncate", "delete-range", "missing", "swap-from-other-bank") and name != "manifest.json":
            assert outcome == "error"  # data files are checksummed: any change is caught

    assert run_for(BUDGET, fuzz) >= 1


def test_changed_bank_json_with_valid_checksums_is_validated(originals, tmp_path):
    bank, files, _ = originals
    path = tmp_path / "bank"
    record_name, _ = names(files)

    @SETTINGS
    @given(data=st.data())
    def fuzz(data):
        mutated = dict(files)
        record = mutate_json(data, json.loads(files[record_name]))
        mutated[record_name] = json.dumps(record).encode()
        rehash(mutated)
        write(path, mutated)
        judge(load_within(path, fingerprint=data.draw(st.sampled_from([None, FINGERPRINT]))))

    assert run_for(BUDGET, fuzz) >= 1


def test_changed_tensor_file_with_valid_checksums_is_validated(originals, tmp_path):
    bank, files, _ = originals
    path = tmp_path / "bank"
    _, tensor_name = names(files)
    raw = files[tensor_name]
    (n,) = struct.unpack("<Q", raw[:8])
    header, payload = json.loads(raw[8:8 + n]), raw[8 + n:]

    @SETTINGS
    @given(data=st.data())
    def fuzz(data):
        mutated = dict(files)
        kind = data.draw(st.sampled_from(["header", "payload", "length-prefix"]))
        if kind == "header":
            blob = json.dumps(mutate_json(data, json.loads(json.dumps(header)))).encode()
            blob += b" " * (-len(blob) % 8)
            mutated[tensor_name] = struct.pack("<Q", len(blob)) + blob + payload
        elif kind == "payload":  # any bytes, e.g. NaN embeddings: loadable K-V or a clear error
            at = data.draw(st.integers(0, len(payload) - 1))
            chunk = data.draw(st.binary(min_size=1, max_size=8))
            mutated[tensor_name] = raw[:8 + n] + (payload[:at] + chunk + payload[at + len(chunk):])[:len(payload)]
        else:
            mutated[tensor_name] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))) + raw[8:]
        rehash(mutated)
        write(path, mutated)
        judge(load_within(path))

    assert run_for(BUDGET, fuzz) >= 1


def test_changed_manifest_and_mismatched_loaders(originals, tmp_path):
    bank, files, _ = originals
    path = tmp_path / "bank"

    @SETTINGS
    @given(data=st.data())
    def fuzz(data):
        mutated = dict(files)
        mutated["manifest.json"] = json.dumps(mutate_json(data, json.loads(files["manifest.json"]))).encode()
        write(path, mutated)
        judge(load_within(path), original=bank)

    write(path, files)  # mismatched loaders: each names both sides
    for kwargs, words in [({"embedder": OtherEmbedder()}, ["hash-embedder", "other-embedder"]),
                          ({"fingerprint": {**FINGERPRINT, "kv_heads": 3}}, ["kv_heads: saved 2, this model 3"])]:
        out = load_within(path, **kwargs)
        assert isinstance(out.get("error"), MemoryFileError) and all(w in str(out["error"]) for w in words)
    assert run_for(BUDGET, fuzz) >= 1
