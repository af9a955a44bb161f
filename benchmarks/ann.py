"""Approximate (IVF) against exact (flat) dense search at up to a million chunks: recall@k and search time.

Synthetic unit vectors (``--dim``, 384 like all-MiniLM-L6-v2) drawn around ``--clusters`` random centres at distance
``--spread`` (0.8: cosine ~0.6 between members of a cluster; real embeddings cluster by topic, while uniformly
random vectors in 384 dimensions have no near neighbours to find), and queries that are stored vectors plus
noise of norm 0.3. Both indexes are the bank's own :class:`memlong.search.NamespaceIndex`
(``ann_min=None``: ``IndexFlatIP``; ``ann_min=1000``: ``IndexIVFFlat``, ``nlist ~ 4 sqrt(n)``, ``nprobe``
= ``--probe`` of the lists). recall@k = share of the exact top-k that the IVF top-k returns; search time = one
query at a time, median, single thread. Then ``--delete`` share of the chunks is deleted and recall measured again
(deleted chunks must never come back).

    python benchmarks/ann.py --n 1000000 --json results/ann.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import faiss
import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def timed_search(index, queries: np.ndarray, k: int) -> tuple[list[list[str]], float]:
    found, times = [], []
    for q in queries:
        t0 = time.perf_counter()
        hits = index.dense(q.reshape(1, -1), k)
        times.append(time.perf_counter() - t0)
        found.append([cid for cid, _ in hits])
    return found, statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--clusters", type=int, default=5000)
    p.add_argument("--spread", type=float, default=0.8, help="norm of a vector's offset from its centre")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--probe", type=float, nargs="+", default=[1 / 64, 1 / 32, 1 / 16])
    p.add_argument("--delete", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    faiss.omp_set_num_threads(args.threads)
    from memlong.search import NamespaceIndex

    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((args.clusters, args.dim)))
    ids = [f"{i:024x}" for i in range(args.n)]
    exact = NamespaceIndex(args.dim, False)
    approx = NamespaceIndex(args.dim, False, ann_min=1000)
    build = {"flat": 0.0, "ivf": 0.0}
    step = 100_000
    for lo in range(0, args.n, step):  # added in batches, as a growing namespace is (the IVF retrains as it doubles)
        hi = min(args.n, lo + step)
        noise = args.spread * rng.standard_normal((hi - lo, args.dim)) / args.dim ** 0.5
        x = unit(centres[rng.integers(0, args.clusters, hi - lo)] + noise)
        for name, index in (("flat", exact), ("ivf", approx)):
            t0 = time.perf_counter()
            index.add(ids[lo:hi], x, [""] * (hi - lo), [""] * (hi - lo))
            build[name] += time.perf_counter() - t0
    picks = rng.integers(0, args.n, args.queries)
    queries = unit(exact.embeddings[picks] + 0.3 * rng.standard_normal((args.queries, args.dim)) / args.dim ** 0.5)
    truth, flat_s = timed_search(exact, queries, args.k)
    rows = []

    def recall(found):
        return statistics.fmean(len(set(f) & set(t)) / args.k for f, t in zip(found, truth))

    nlist = approx.ann.nlist
    for probe in args.probe:
        approx.ann.nprobe = max(8, int(nlist * probe))
        found, ivf_s = timed_search(approx, queries, args.k)
        rows.append({"n": args.n, "nlist": nlist, "nprobe": approx.ann.nprobe, "recall_at_k": recall(found),
                     "ivf_search_ms": ivf_s * 1e3, "flat_search_ms": flat_s * 1e3})
        print(json.dumps(rows[-1]), flush=True)
    drop = set(rng.choice(ids, int(args.n * args.delete), replace=False).tolist())
    t0 = time.perf_counter()
    approx.remove(drop)
    remove_s = time.perf_counter() - t0
    exact.remove(drop)
    truth, flat_s = timed_search(exact, queries, args.k)
    approx.ann.nprobe = max(8, int(nlist * (1 / 16)))
    found, ivf_s = timed_search(approx, queries, args.k)
    after = {"deleted": len(drop), "ivf_remove_s": remove_s, "recall_at_k": recall(found), "ivf_search_ms": ivf_s * 1e3,
             "flat_search_ms": flat_s * 1e3, "deleted_returned": sum(c in drop for f in found for c in f),
             "ntotal_equals_ids": approx.ntotal == len(approx.ids)}
    print(json.dumps(after), flush=True)
    out = {"benchmark": "ann", "args": {k: v for k, v in vars(args).items() if k != "json"}, "build_s": build,
           "rows": rows, "after_delete": after, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": "2-core CPU shared with other jobs (contended), faiss 1 thread"}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
