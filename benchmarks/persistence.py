"""Measure saving/loading a real MemLong memory and reader throughput beside a writer (README numbers).

    python benchmarks/persistence.py --tokens 8192 --json results/persistence.json

1. Ingest the first ``--tokens`` tokens of Macbeth (with a planted fact) into the default model's memory,
   answer a question, save the memory, load it into a fresh MemLong on the same weights, answer again.
2. 8 threads search + fetch the loaded bank for ``--seconds`` while 1 thread adds chunks, once with the
   bank's reader-writer lock and once with every call forced through one plain lock (the old design, as a
   proxy around the bank).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


class OneLock:
    """The old design, from outside: every call on ``bank`` (search, fetch, add_chunks, ...) takes one plain lock.

    A proxy, so that the bank's own reader-writer lock stays untouched; under the outer lock it is never
    contended, so calls are serialised exactly as with one lock.
    """

    def __init__(self, bank) -> None:
        self.bank = bank
        self.lock = threading.RLock()

    def __getattr__(self, name: str):
        attr = getattr(self.bank, name)
        if not callable(attr):
            return attr

        def locked(*args, **kwargs):
            with self.lock:
                return attr(*args, **kwargs)

        return locked


def throughput(bank, namespace: str, seconds: float, vectors, readers: int = 8) -> dict:
    stop = threading.Event()
    reads = [0] * readers
    writes = [0]
    chunk = bank.get(bank.chunk_ids(namespace)[0], namespace=namespace)

    def reader(r: int) -> None:
        i = r
        while not stop.is_set():
            hits = bank.search(vectors[i % len(vectors)], namespace=namespace, k=4, count=False)
            bank.fetch([h.chunk_id for h in hits], namespace=namespace)
            reads[r] += 1
            i += readers

    def writer() -> None:
        i = 0
        while not stop.is_set():
            ids = bank.add_chunks([f"writer chunk {i}"], keys=[chunk.keys], values=[chunk.values],
                                  namespace="writer", embeddings=vectors[i % len(vectors)][None])
            bank.delete(ids, namespace="writer")
            writes[0] += 1
            i += 1

    threads = [threading.Thread(target=reader, args=(r,)) for r in range(readers)] + [threading.Thread(target=writer)]
    t0 = time.perf_counter()
    [t.start() for t in threads]
    time.sleep(seconds)
    stop.set()
    [t.join() for t in threads]
    dt = time.perf_counter() - t0
    return {"reads_per_s": round(sum(reads) / dt, 1), "writes_per_s": round(writes[0] / dt, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens of Macbeth ingested (default 8192)")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds of each reader/writer run (default 10)")
    ap.add_argument("--json", default=None, metavar="OUT",
                    help="write the record as JSON (the README's: results/persistence.json)")
    args = ap.parse_args()
    if args.tokens < 64 or args.seconds <= 0:
        ap.error("--tokens must be at least 64 and --seconds positive")
    from memlong import MemLong, MemoryBank
    from memlong.evaluation import shakespeare_text

    out: dict = {"tokens": args.tokens}

    def dump() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))

    ml = MemLong.from_pretrained("default", top_k=4)
    ids = ml.tokenize(shakespeare_text("macbeth"))[: args.tokens]
    text = ml.tokenizer.decode(ids)
    cut = text.rfind("\n", 0, len(text) // 2)
    text = text[:cut] + "\nThe secret ingredient of the royal cake is purple saffron from the island of Zanthe.\n" \
        + text[cut:]
    t0 = time.perf_counter()
    stats = ml.ingest(text, namespace="demo", progress=False)
    out.update(ingest_s=round(time.perf_counter() - t0, 1), chunks=stats.chunks,
               bank_bytes=ml.bank.nbytes(), memory_dtype=str(ml.bank.dtype))
    question = "What is the secret ingredient of the royal cake?"
    ask = dict(query=question, namespace="demo", answer_prefix=" The secret ingredient of the royal cake is",
               max_new_tokens=12)
    before = ml.generate(f"\nQuestion: {question}\nAnswer:", **ask)
    chunks_before = ml.last_generation.chunk_ids
    dump()

    tmp = Path(tempfile.mkdtemp())
    try:
        t0 = time.perf_counter()
        ml.save_memory(tmp / "mem")
        out.update(save_s=round(time.perf_counter() - t0, 2), disk_bytes=dir_bytes(tmp / "mem"))
        t0 = time.perf_counter()
        ml.save_memory(tmp / "mem")  # overwrite: the atomic replace path
        out["resave_s"] = round(time.perf_counter() - t0, 2)
        fresh = MemLong(ml.model, ml.tokenizer, ml.config, embedder=ml.bank.embedder)
        t0 = time.perf_counter()
        fresh.load_memory(tmp / "mem")
        out["load_s"] = round(time.perf_counter() - t0, 2)
        same_kv = all(torch.equal(ml.bank.get(c, namespace="demo").keys, fresh.bank.get(c, namespace="demo").keys)
                      and torch.equal(ml.bank.get(c, namespace="demo").values,
                                      fresh.bank.get(c, namespace="demo").values)
                      for c in ml.bank.chunk_ids("demo"))
        after = fresh.generate(f"\nQuestion: {question}\nAnswer:", **ask)
        out.update(answer_before=before, answer_after=after, same_answer=before == after,
                   same_retrieved_chunks=chunks_before == fresh.last_generation.chunk_ids, same_kv=same_kv)
        dump()
        bank = MemoryBank.load(tmp / "mem", embedder=ml.bank.embedder)
    finally:
        shutil.rmtree(tmp)
    vectors = ml.bank.embedder.encode([f"line {i} of a question about the play" for i in range(64)])
    rw = throughput(bank, "demo", args.seconds, vectors)
    one = throughput(OneLock(bank), "demo", args.seconds, vectors)
    out["concurrency"] = {"readers": 8, "writers": 1, "seconds": args.seconds, "rw_lock": rw, "one_lock": one,
                          "read_ratio_rw_over_one": round(rw["reads_per_s"] / max(one["reads_per_s"], 1e-9), 2)}
    dump()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
