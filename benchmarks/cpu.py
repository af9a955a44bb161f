"""CPU benchmarks on the default model; every ratio is measured side by side in one run.

* ``ingest``: MemLong.ingest tokens/s vs plain HF prefill of the same tokens in the same window sizes
  (each window of ``local_window`` tokens prefilled on its own, no memory), alternating the two
  ``--ingest-repeats`` times and taking medians, for each ``--ingest-top-k``
  (chunks retrieved and attended while storing; the library default is 0) and each ``--ingest-steps``
  (tokens per streaming step, ``MemLongConfig.ingest_step``; the cache keeps ``local_window - step`` tokens).
* ``ttft``: time to first token of a RAG answer with the retrieved chunks as K-V (only the question is
  encoded) vs re-encoding the same retrieved text with the question (plain HF prefill), for
  ``N x 512`` retrieved tokens.
* ``faiss``: retrieval latency vs bank size (synthetic unit vectors, 384-d, k=8): ``MemoryBank.search``
  up to ``--bank-max`` chunks, the bare faiss index beyond; with the bank also lexical (BM25) and hybrid search
  (text queries over 90-word chunks of the plays; hybrid includes embedding the query).
* ``bytes``: bytes of memory per stored token vs a full all-layer K-V cache of the same model.

    python benchmarks/cpu.py --json results/bench-cpu.json --plot results/bench-cpu.png

Rows measured by separate runs go into one plot with ``--replot`` (no benchmark runs; a later file's records
replace an earlier file's records of the same benchmark)::

    python benchmarks/cpu.py --replot results/bench-cpu.json results/bench-cpu-ingest-step-896-idle.json \
        results/bench-cpu-ttft.json results/bench-cpu-search.json --plot results/bench-cpu.png

Run it alone: other jobs on the same cores change absolute times (the ratios are measured in one run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from memlong.cli_args import int_list


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_ingest(ml, text: str, tokens: int, ingest_ks: list[int], repeats: int = 3,
                 steps: list[int | None] | None = None) -> list[dict]:
    """One row per ``ingest_top_k`` and ``ingest_step``: MemLong ingest and the plain prefill alternate ``repeats``
    times (so a machine that slows down or speeds up during the run affects both alike); medians, and the ratio's
    range."""
    ids = ml.tokenize(text)[:tokens]
    doc = ml.tokenizer.decode(ids)
    ids = ml.tokenize(doc)
    window = ml.config.local_window
    base = ml.config
    rows = []
    ml.ingest(doc[:2000], namespace="bench-warmup", progress=False)  # first-call costs out of the timings
    ml.reset("bench-warmup")
    for k, step in [(k, step) for k in ingest_ks for step in (steps or [None])]:
        ml.config = dataclasses.replace(base, ingest_top_k=k, ingest_step=step)
        memlong_runs, plain_runs, parts_runs = [], [], []
        for _ in range(repeats):
            ml.reset("bench")
            with _Timers(ml) as parts:  # where the time goes: model forward, embedder, retrieval, bank writes
                t0 = time.perf_counter()
                ml.ingest(doc, namespace="bench", progress=False)
                memlong_runs.append(time.perf_counter() - t0)
            parts_runs.append(parts.seconds)
            bank_bytes_per_token = ml.bank.nbytes("bench") / ml.bank.num_tokens("bench")
            ml.reset("bench")
            t0 = time.perf_counter()
            with torch.no_grad():
                for s in range(0, len(ids), window):
                    ml.model(torch.tensor([ids[s:s + window]], device=ml.device), use_cache=False, logits_to_keep=1)
            plain_runs.append(time.perf_counter() - t0)
        memlong_s, plain_s = statistics.median(memlong_runs), statistics.median(plain_runs)
        ratios = [p / m for p, m in zip(plain_runs, memlong_runs)]
        mid = sorted(range(repeats), key=memlong_runs.__getitem__)[(repeats - 1) // 2]  # the median run's split
        rows.append({"bench": "ingest", "ingest_top_k": k, "ingest_step": ml.config.store_step, "tokens": len(ids),
                     "memlong_tok_s": len(ids) / memlong_s,
                     "plain_prefill_tok_s": len(ids) / plain_s, "ratio": plain_s / memlong_s,
                     "ratio_min": min(ratios), "ratio_max": max(ratios), "repeats": repeats,
                     "bank_bytes_per_token": bank_bytes_per_token,
                     **{f"{name}_s": round(t, 3) for name, t in parts_runs[mid].items()},
                     "other_s": round(memlong_runs[mid] - sum(parts_runs[mid].values()), 3)})
    ml.config = base
    return rows


class _Timers:
    """Time the parts of a call by wrapping (on these instances only) the methods each part goes through.

    ``parts``: ``(object, method name, part, minus)`` tuples; ``minus`` names a part whose time spent inside
    this method is not counted again. Default: the parts of an ingest. ``forward``: the decoder run
    (``MemLong.run``); ``embed``: the retriever embedder; ``search``: retrieval (faiss + the query's embedding
    when it is text); ``bank_write``: ``add_chunks`` minus its embedding.
    ``sync``: called before and after each timed call (``torch.cuda.synchronize`` on a GPU, where kernels
    run asynchronously and would otherwise be charged to whichever part waits for them).
    """

    def __init__(self, ml, sync=None, parts=None) -> None:
        self.sync = sync or (lambda: None)
        self.parts = parts or [(ml, "run", "forward", None), (ml.bank.embedder, "encode", "embed", None),
                               (ml.bank, "search", "search", "embed"), (ml.bank, "add_chunks", "bank_write", "embed")]
        self.seconds = {part: 0.0 for _, _, part, _ in self.parts}

    def _wrap(self, obj, name: str, part: str, minus: str | None = None):
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            before = self.seconds[minus] if minus else 0.0
            self.sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                inner = (self.seconds[minus] - before) if minus else 0.0
                self.seconds[part] += time.perf_counter() - t0 - inner

        setattr(obj, name, timed)

    def __enter__(self):
        for obj, name, part, minus in self.parts:
            self._wrap(obj, name, part, minus)
        return self

    def __exit__(self, *exc) -> None:
        for obj, name, _, _ in self.parts:
            delattr(obj, name)  # back to the class's method


def bench_ttft(ml_512, text: str, n_chunks: list[int], repeats: int) -> list[dict]:
    """``ml_512``: a MemLong with chunk_size 512 (one retrieved chunk = 512 tokens)."""
    need = max(n_chunks) * 512 + 256
    ids = ml_512.tokenize(text)[:need]
    ml_512.reset("ttft")
    ml_512.ingest(ml_512.tokenizer.decode(ids), namespace="ttft", progress=False)
    chunk_ids = [c for c in ml_512.bank.chunk_ids("ttft") if ml_512.bank.get(c, namespace="ttft").n_tokens == 512]
    question = "\nQuestion: Who speaks first in this scene?\nAnswer:"
    rows = []
    for n in n_chunks:
        chosen = chunk_ids[:n]
        kv = lambda chosen=chosen: ml_512.generate(question, namespace="ttft", chunk_ids=chosen, max_new_tokens=1)
        kv()  # warm up
        kv_s = _median_time(kv, repeats)
        encoded = ml_512.last_generation.prompt_tokens
        context = "".join(ml_512.bank.get(c, namespace="ttft").text for c in chosen)
        full = torch.tensor([ml_512.tokenize(context + question)], device=ml_512.device)

        def reencode(full=full):
            with torch.no_grad():
                ml_512.model(full, use_cache=True, logits_to_keep=1).logits[0, -1].argmax()

        reencode()
        re_s = _median_time(reencode, repeats)
        rows.append({"bench": "ttft", "retrieved": f"{n} x 512", "kv_tokens_encoded": encoded,
                     "reencode_tokens_encoded": int(full.shape[1]), "kv_ttft_s": kv_s, "reencode_ttft_s": re_s,
                     "ratio": re_s / kv_s})
    ml_512.reset("ttft")
    return rows


def bench_faiss(sizes: list[int], bank_max: int, queries: int = 200) -> list[dict]:
    import faiss

    from memlong import MemoryBank
    from memlong.embedder import Embedder

    rng = np.random.default_rng(0)
    dim = 384
    qs = rng.standard_normal((queries, dim)).astype(np.float32)
    faiss.normalize_L2(qs)
    rows = []
    for size in sizes:
        vectors = rng.standard_normal((size, dim)).astype(np.float32)
        faiss.normalize_L2(vectors)
        row = {"bench": "faiss", "chunks": size}
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        t0 = time.perf_counter()
        for q in qs:
            index.search(q[None], 8)
        row["faiss_ms"] = (time.perf_counter() - t0) / queries * 1e3
        if size <= bank_max:
            bank = MemoryBank(embedder=Embedder(), capacity=10**12)
            kv = torch.zeros(1, 1, 1, 2)
            step = 10_000
            texts = _chunk_texts(size, rng)  # real words, so that the BM25 postings are as long as a corpus' are
            for s in range(0, size, step):
                n = min(step, size - s)
                bank.add_chunks(texts[s:s + n], keys=[kv] * n, values=[kv] * n, namespace="b",
                                embeddings=vectors[s:s + n])
            t0 = time.perf_counter()
            for q in qs:
                bank.search(q, namespace="b", k=8)
            row["bank_ms"] = (time.perf_counter() - t0) / queries * 1e3
            questions = [" ".join(texts[int(i)].split()[5:15]) for i in rng.integers(0, size, 20)]
            for mode in ("lexical", "hybrid"):  # text queries; hybrid includes embedding the query
                t0 = time.perf_counter()
                for question in questions:
                    bank.search(question, namespace="b", k=8, mode=mode)
                row[f"{mode}_ms"] = (time.perf_counter() - t0) / len(questions) * 1e3
        rows.append(row)
    return rows


def _chunk_texts(n: int, rng: np.random.Generator, words: int = 90) -> list[str]:
    """``n`` chunk texts of ``words`` consecutive words from random places in the packaged plays."""
    from memlong.evaluation import shakespeare_text

    corpus = " ".join(shakespeare_text(p) for p in ("hamlet", "macbeth", "othello", "lear")).split()
    starts = rng.integers(0, len(corpus) - words, n)
    return [" ".join(corpus[s:s + words]) for s in starts]


def bench_bytes(ml) -> list[dict]:
    full = 2 * ml.num_layers * ml.kv_heads * ml.head_dim * torch.finfo(torch.float16).bits // 8
    rows = []
    for kv_source in ("per_layer", "memory_layer"):
        sources = ml.num_layers if kv_source == "per_layer" else 1
        per_token = 2 * sources * ml.kv_heads * ml.head_dim * torch.finfo(ml.bank.dtype).bits // 8
        rows.append({"bench": "bytes", "kv_source": kv_source, "memory_bytes_per_token": per_token,
                     "full_cache_fp16_bytes_per_token": full, "ratio": per_token / full})
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    ing = [r for r in rows if r["bench"] == "ingest"]
    if ing:
        labels = [f"MemLong\nk={r['ingest_top_k']}\nstep {r.get('ingest_step', '-')}" for r in ing] + ["plain\nprefill"]
        heights = [r["memlong_tok_s"] for r in ing] + [statistics.mean(r["plain_prefill_tok_s"] for r in ing)]
        axes[0].bar(labels, heights, color=["#2171b5"] * len(ing) + ["#bbbbbb"])
        axes[0].set_ylabel("tokens / s")
        axes[0].set_title(f"ingestion ({ing[0]['tokens']} tokens)")
    ttft = [r for r in rows if r["bench"] == "ttft"]
    if ttft:
        x = np.arange(len(ttft))
        kv = axes[1].bar(x - 0.2, [r["kv_ttft_s"] for r in ttft], 0.4, label="K-V injection", color="#2171b5")
        re = axes[1].bar(x + 0.2, [r["reencode_ttft_s"] for r in ttft], 0.4, label="re-encode text", color="#bbbbbb")
        for bars in (kv, re):
            axes[1].bar_label(bars, fmt="%.2f s", fontsize=8)
        axes[1].set_xticks(x, [r["retrieved"] for r in ttft])
        axes[1].set_ylabel("seconds")
        axes[1].set_title("time to first token")
        axes[1].legend()
    fa = [r for r in rows if r["bench"] == "faiss"]
    if fa:
        axes[2].loglog([r["chunks"] for r in fa], [r["faiss_ms"] for r in fa], "o-", label="faiss IndexFlatIP")
        bank = [r for r in fa if "bank_ms" in r]
        axes[2].loglog([r["chunks"] for r in bank], [r["bank_ms"] for r in bank], "s-", label="MemoryBank.search")
        for mode, marker in (("lexical", "^-"), ("hybrid", "v-")):
            timed = [r for r in bank if f"{mode}_ms" in r]  # measured since the lexical index exists
            if timed:
                axes[2].loglog([r["chunks"] for r in timed], [r[f"{mode}_ms"] for r in timed], marker,
                               label=f"MemoryBank.search, {mode}")
        axes[2].set_xlabel("chunks in the bank")
        axes[2].set_ylabel("ms / query")
        axes[2].set_title("retrieval latency (k=8, 384-d)")
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _table(rows: list[dict]) -> str:
    out = []
    for bench in dict.fromkeys(r["bench"] for r in rows):
        group = [r for r in rows if r["bench"] == bench]
        cols = list(dict.fromkeys(k for r in group for k in r))
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "|".join(" --- " for _ in cols) + "|")
        out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in group]
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benches", default="ingest,ttft,faiss,bytes", help="comma-separated subset to run")
    p.add_argument("--ingest-tokens", type=int, default=8192, help="document length for the ingest benchmark")
    p.add_argument("--ingest-top-k", default="0,8",
                   help="ingest_top_k values to time (default 0,8: the default, and retrieving top_k while storing)")
    p.add_argument("--ingest-steps", default=None,
                   help="comma-separated ingest_step values to time (default: the config's store_step: the window "
                        "less one chunk when nothing is retrieved while storing, half-window steps otherwise)")
    p.add_argument("--ttft-chunks", type=int_list(1), default=[8, 16],
                   help="retrieved 512-token chunks for the TTFT benchmark (default 8,16)")
    p.add_argument("--faiss-sizes", type=int_list(1), default=[1000, 10000, 100000, 1000000],
                   help="bank sizes in chunks (default 1000,10000,100000,1000000)")
    p.add_argument("--bank-max", type=int, default=100_000, help="largest size also measured through MemoryBank")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median) per TTFT point")
    p.add_argument("--ingest-repeats", type=int, default=3,
                   help="alternating MemLong / plain-prefill runs per ingest row (medians; the ratio's range too)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", metavar="OUT", help="write the records as JSON")
    p.add_argument("--plot", metavar="PNG", help="write a plot")
    p.add_argument("--replot", nargs="+", metavar="JSON",
                   help="run nothing: plot the records of these --json files into --plot (a later file's records "
                        "replace an earlier file's records of the same benchmark)")
    args = p.parse_args(argv)
    if args.replot:
        if not args.plot:
            p.error("--replot needs --plot PNG (the file to write)")
        rows = []
        for name in args.replot:
            found = json.loads(Path(name).read_text())["records"]
            rows = [r for r in rows if r["bench"] not in {f["bench"] for f in found}] + found
        plot(rows, args.plot)
        print(f"wrote {args.plot} from {len(rows)} records")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    from memlong import MemLong
    from memlong.evaluation import shakespeare_text

    benches = [b for b in args.benches.split(",") if b]
    if not benches or set(benches) - {"ingest", "ttft", "faiss", "bytes"}:
        p.error(f"--benches {args.benches!r}: choose a comma-separated subset of ingest,ttft,faiss,bytes")
    text = shakespeare_text("hamlet")
    rows: list[dict] = []
    ml = None
    if {"ingest", "bytes"} & set(benches):
        ml = MemLong.from_pretrained("default")
    if "ingest" in benches:
        rows += bench_ingest(ml, text, args.ingest_tokens, [int(k) for k in args.ingest_top_k.split(",")],
                             args.ingest_repeats,
                             [int(x) for x in args.ingest_steps.split(",")] if args.ingest_steps else None)
        print(_table([r for r in rows if r["bench"] == "ingest"]), file=sys.stderr)
    if "ttft" in benches:
        ml_512 = MemLong.from_pretrained("default", chunk_size=512, local_window=2048)
        # 16 x 512 retrieved tokens + the question exceed the default model's 8,192 positions; RoPE is computed
        # for any position, so timing is unaffected (answers that far out would not be meaningful)
        ml_512.max_positions = max(ml_512.max_positions, max(args.ttft_chunks) * 512 + 512)
        rows += bench_ttft(ml_512, text, args.ttft_chunks, args.repeats)
        del ml_512
    if "faiss" in benches:
        rows += bench_faiss(args.faiss_sizes, args.bank_max)
    if "bytes" in benches:
        rows += bench_bytes(ml)
    print(_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": {"torch_threads": torch.get_num_threads(),
                                                           "device": "cpu"}, "records": rows}, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
