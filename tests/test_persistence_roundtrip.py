"""MemLong.save_memory -> load_memory is the identity on the real default model (issue 16): several small
documents in several namespaces (three or more non-empty ones: the case that once saved an unloadable bank)."""

import pytest
import torch
from test_persistence import assert_same_bank

from memlong import MemoryBank

DOCS = {
    "alice": ["Alice keeps the iron key under the third stone of the garden wall.",
              "The garden wall was built in 1820 by a mason named Hobbs."],
    "bob": ["Bob's falcon nests in the north tower and hunts at dawn."],
    "carol": ["Carol counts 47 bells in the abbey.", "The abbey bells ring at noon and at midnight.",
              "Nobody has climbed the abbey tower since the storm."],
    "dave": ["Dave sails to Zanthe every spring for purple saffron."],
}


@pytest.mark.slow
def test_save_memory_load_memory_round_trip_on_the_default_model(default_memlong, tmp_path):
    ml = default_memlong
    names = [f"_rt-{n}" for n in DOCS]
    try:
        for (name, docs), ns in zip(DOCS.items(), names):
            ml.ingest(docs, namespace=ns, progress=False, doc_ids=[f"{name}-{i}" for i in range(len(docs))],
                      metadatas=[{"owner": name, "n": i} for i in range(len(docs))])
        for ns in names:
            ml.bank.search("Who keeps the key?", namespace=ns, k=1)  # counters travel too
        before = MemoryBank(embedder=ml.bank.embedder, capacity=ml.bank.capacity, dtype=ml.bank.dtype)
        path = ml.save_memory(tmp_path / "memory", namespaces=names)
        before.restore(path, fingerprint=None)
        answer = ml.generate("Where is the iron key?", namespace=names[0], max_new_tokens=8, stream=False)
        for ns in names:
            ml.bank.reset(ns)
        assert ml.load_memory(path) == names
        assert_same_bank(before, _view(ml.bank, names))
        assert ml.generate("Where is the iron key?", namespace=names[0], max_new_tokens=8, stream=False) == answer
        keys, _ = ml.bank.fetch(ml.bank.chunk_ids(names[2]), namespace=names[2])
        assert torch.isfinite(keys).all()
    finally:
        for ns in names:
            ml.bank.reset(ns)


def _view(bank, names):
    """A bank holding only ``names`` of ``bank`` (other tests' namespaces may share the session model)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        bank.save(d, namespaces=names)
        return MemoryBank.load(d, embedder=bank.embedder)
