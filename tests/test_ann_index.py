"""The approximate (IVF) dense index of large namespaces: trained when a namespace reaches ``ann_min_chunks``,
retrained as it doubles, exact deletes, high recall against the flat index on clustered vectors."""

import numpy as np
import pytest
import torch
from test_persistence import HashEmbedder

from memlong import MemoryBank
from memlong.search import NamespaceIndex


def clustered(n, dim=16, clusters=40, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim)) / dim ** 0.5 * np.sqrt(dim) / 4
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_ivf_index_recall_deletes_and_retraining():
    dim, n = 16, 6000
    x = clustered(n, dim)
    ids = [f"{i:024x}" for i in range(n)]
    exact, approx = NamespaceIndex(dim, False), NamespaceIndex(dim, False, ann_min=1000)
    for lo in range(0, n, 1500):
        exact.add(ids[lo:lo + 1500], x[lo:lo + 1500], *[[""] * len(ids[lo:lo + 1500])] * 2)
        approx.add(ids[lo:lo + 1500], x[lo:lo + 1500], *[[""] * len(ids[lo:lo + 1500])] * 2)
    # trained at 1500 chunks, retrained at 3000 and 6000
    assert approx.ann is not None and approx.index is None and approx.trained_at == 6000
    assert approx.ntotal == n == exact.ntotal
    queries = clustered(100, dim, seed=1)

    def recall():
        hits = [(set(c for c, _ in exact.dense(q[None], 8)), set(c for c, _ in approx.dense(q[None], 8)))
                for q in queries]
        return np.mean([len(a & b) / 8 for a, b in hits])

    assert recall() >= 0.9
    drop = set(ids[::3])
    approx.remove(drop)
    exact.remove(drop)
    assert approx.ntotal == len(approx.ids) == n - len(drop) and set(approx.ids) == set(exact.ids)
    assert not drop & {c for q in queries for c, _ in approx.dense(q[None], 50)}  # deleted: never returned
    assert recall() >= 0.9


def test_bank_with_an_ivf_index_searches_and_deletes(tmp_path):
    bank = MemoryBank(embedder=HashEmbedder(), ann_min_chunks=1000)
    vectors = clustered(1200)
    k = torch.zeros(1, 1, 1, 2)
    ids = bank.add_chunks([f"chunk {i}" for i in range(1200)], keys=[k] * 1200, values=[k] * 1200,
                          embeddings=vectors, namespace="big")
    assert bank._spaces["big"].ann is not None
    hits = bank.search(vectors[7], namespace="big", k=3)
    assert hits[0].chunk_id == ids[7]
    bank.delete([ids[7]], namespace="big")
    assert ids[7] not in {h.chunk_id for h in bank.search(vectors[7], namespace="big", k=3)}
    bank.save(tmp_path / "b")
    loaded = MemoryBank.load(tmp_path / "b", embedder=HashEmbedder(), ann_min_chunks=1000)
    assert loaded._spaces["big"].ann is not None and loaded.search(vectors[8], namespace="big", k=1)[0].chunk_id == ids[8]
    with pytest.raises(ValueError, match="ann_min_chunks must be None .* or at least 1000"):
        MemoryBank(embedder=HashEmbedder(), ann_min_chunks=10)
