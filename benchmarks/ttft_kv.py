"""Time to first token with retrieved chunks as K-V only (no re-encoding baseline): for bisecting answer-time speed.

``benchmarks/cpu.py --benches ttft`` also times re-encoding the same text (tens of seconds); this times only
``ml.generate`` with ``--chunks`` 512-token chunks of Hamlet given as ids (chunk_size 512, local_window 2048), one
new token, median and minimum of ``--repeats`` calls after two warm-ups. It uses only calls that exist since 26
November 2026, so it runs against older code too, e.g. in a git worktree:

    python benchmarks/ttft_kv.py                                  # this checkout
    PYTHONPATH=/tmp/old python benchmarks/ttft_kv.py --label old  # a worktree of an older commit

The 7 December bisect (docs/results-history.md) ran it this way: 8 chunks, 7 repeats, 2 threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def _positive(text: str) -> int:  # not memlong.cli_args: older code, which this also runs against, lacks it
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=_positive, default=8, help="retrieved 512-token chunks (default 8)")
    p.add_argument("--repeats", type=_positive, default=7, help="timed calls (default 7)")
    p.add_argument("--threads", type=_positive, default=2, help="torch threads (default 2)")
    p.add_argument("--label", default="", help="printed before the figures (e.g. a commit)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from memlong import MemLong
    from memlong.evaluation import shakespeare_text

    ml = MemLong.from_pretrained("default", chunk_size=512, local_window=2048)
    ids = ml.tokenize(shakespeare_text("hamlet"))[:args.chunks * 512 + 256]
    try:
        ml.ingest(ml.tokenizer.decode(ids), namespace="ttft", progress=False)
    except TypeError:  # code older than ingest(progress=...)
        ml.ingest(ml.tokenizer.decode(ids), namespace="ttft")
    chunk_ids = [c for c in ml.bank.chunk_ids("ttft") if ml.bank.get(c, namespace="ttft").n_tokens == 512]
    chunk_ids = chunk_ids[:args.chunks]
    question = "\nQuestion: Who speaks first in this scene?\nAnswer:"

    def answer() -> None:
        ml.generate(question, namespace="ttft", chunk_ids=chunk_ids, max_new_tokens=1)

    answer()
    answer()
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        answer()
        times.append(time.perf_counter() - t)
    print(f"{args.label} {len(chunk_ids)} x 512 as K-V: time to first token median {statistics.median(times):.3f} s, "
          f"min {min(times):.3f} s".strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
