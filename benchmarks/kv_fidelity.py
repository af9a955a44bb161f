"""How close retrieved K-V come to pasting the same chunks' text: the frontier of the multi-chunk reading options.

No framework and no retriever choice in the way: for each question the same ``top_k`` chunks (dense search)
are read two ways by the default model,

* ``paste``: ``[sink] + chunk texts + tail`` encoded as text (tail: ``"\\nQuestion: ...\\nAnswer: <prefix>"``
  for the planted-fact corpus, ``"\\nQ: ...\\nA: <prefix>"`` for the gazetteer);
* ``kv``: ``[sink] + stored chunk-alone K-V + tail``, read with one *method*: a ``+``-joined list of
  ``refresh=R`` (``kv_refresh``), ``head=N`` (``kv_reencode_head``, EPIC), ``ape=T/S`` (``memory_temperature``
  / ``memory_scale``, APE), ``reader`` (read through the reader adapter given by ``--reader``,
  :mod:`memlong.reader`; every other method reads with the base model), ``shared`` (every chunk at the positions
  its chunk-alone K-V were computed at, ``1..len`` after the sink, and the question after the longest one: PCW /
  APE positions instead of the library's consecutive ``continual`` layout; not a library option, built here by
  :func:`shared_positions`) or ``kv`` (as stored). ``refresh=1`` re-encodes every retrieved token (the pasted
  reading; the other end of the frontier).

Per (top-k, method): KL(paste || kv) of the first answer token's distribution, how often the first token and the
greedy answer agree (``memlong.evaluation.answer_key``), both sides' accuracy, tokens encoded and re-encoded
per query, and the median time to the first answer token (re-encoding included) of both sides. The JSON keeps
every trial (fact chunk retrieved?, both answers).

    python benchmarks/kv_fidelity.py --top-k 4 --methods kv,head=16,ape=0.9/0.9,refresh=1 \\
        --json results/kv-fidelity-frontier.json --plot results/kv-fidelity-frontier.png
    python benchmarks/kv_fidelity.py --top-k 4,8 --methods kv,shared,shared+ape=0.9/0.9   # positions
    python benchmarks/kv_fidelity.py --replot results/a.json,results/b.json --plot both.png   # no model run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclasses.dataclass(frozen=True)
class Method:
    """One way of reading the retrieved K-V (the config fields it sets)."""

    name: str
    kv_refresh: float = 0.0
    kv_reencode_head: int = 0
    memory_temperature: float = 1.0
    memory_scale: float = 1.0
    memory_reader: bool = False
    shared_positions: bool = False

    @classmethod
    def parse(cls, spec: str) -> Method:
        """``"head=16+ape=0.9/0.9"`` -> Method. Raises ValueError naming the bad part."""
        fields: dict = {}
        for part in spec.split("+"):
            key, _, value = part.partition("=")
            if key == "kv" and not value:
                continue
            if key == "reader" and not value:
                fields["memory_reader"] = True
                continue
            if key == "shared" and not value:
                fields["shared_positions"] = True
                continue
            if key == "refresh":
                fields["kv_refresh"] = float(value)
            elif key == "head":
                fields["kv_reencode_head"] = int(value)
            elif key == "ape":
                t, _, s = value.partition("/")
                fields["memory_temperature"], fields["memory_scale"] = float(t), float(s or t)
            else:
                raise ValueError(f"unknown method part {part!r}: use kv, reader, shared, refresh=R, head=N or ape=T/S "
                                 "joined by '+'.")
        if fields.get("shared_positions") and (fields.get("kv_refresh") or fields.get("kv_reencode_head")):
            raise ValueError(f"{spec!r}: `shared` cannot be combined with refresh/head, which re-encode tokens at "
                             "the consecutive layout's positions.")
        return cls(name=spec, **fields)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="MemLong model (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--corpus", choices=("planted", "gazetteer"), default="planted",
                   help="planted facts in Shakespeare (default) or the invented-island gazetteer (benchmarks/gazetteer.py)")
    p.add_argument("--facts", type=int, default=30, help="planted facts / gazetteer islands (default 30; gazetteer <= 24)")
    p.add_argument("--plays", default="hamlet,macbeth,othello,lear,romeo_and_juliet,twelfth_night")
    p.add_argument("--chars", type=int, default=20_000, help="characters of each play (default 20000)")
    p.add_argument("--top-k", default="1,4", help="comma-separated chunk counts (default 1,4)")
    p.add_argument("--refresh", default="0,0.25,0.5,1",
                   help="comma-separated kv_refresh shares, used when --methods is not given (default 0,0.25,0.5,1)")
    p.add_argument("--methods", help="comma-separated methods (see above), e.g. kv,head=16,ape=0.9/0.9,refresh=1")
    p.add_argument("--reader", metavar="DIR", help="a reader adapter folder (memlong train-reader) for the `reader` "
                                                   "methods (memlong.reader)")
    p.add_argument("--window", type=int, default=2048, help="local_window of the model (default 2048: 8 pasted chunks fit)")
    p.add_argument("--paste-as", choices=("text", "llama-index"), default="text",
                   help="how the chunks are pasted: their texts joined as stored (default; what create_memlong_rag_chain "
                        "pastes) or stripped and joined by blank lines, as LlamaIndex's compact/refine synthesizers "
                        "repack them")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--json", metavar="OUT", help="write the table rows (and every trial) here")
    p.add_argument("--plot", metavar="PNG", help="plot answer agreement against tokens re-encoded per query")
    p.add_argument("--replot", metavar="JSON", help="comma-separated result files to plot (with --plot) and print "
                                                     "instead of running")
    args = p.parse_args(argv)
    args.top_k = [int(x) for x in args.top_k.split(",")]
    specs = args.methods.split(",") if args.methods else [f"refresh={x}" for x in args.refresh.split(",")]
    args.methods = [Method.parse(s) for s in specs]
    if any(m.memory_reader for m in args.methods) and not args.reader:
        p.error("a `reader` method needs --reader DIR, a folder written by `memlong train-reader`")
    return args


def corpus(args: argparse.Namespace) -> tuple[list[str], list]:
    """Documents and questions; every question has ``tail``, ``answer`` and ``correct(text)``."""
    if args.corpus == "gazetteer":
        from gazetteer import gazetteer

        return gazetteer(args.facts)
    from memlong.evaluation import planted_fact_documents

    docs, facts = planted_fact_documents(args.facts, plays=tuple(args.plays.split(",")), chars=args.chars, seed=0,
                                         distinct=True)
    return docs, [_Planted(f) for f in facts]


@dataclasses.dataclass(frozen=True)
class _Planted:
    fact: object

    @property
    def question(self) -> str:
        return self.fact.question

    @property
    def answer(self) -> str:
        return self.fact.answer

    @property
    def tail(self) -> str:
        return f"\nQuestion: {self.fact.question}\nAnswer: {self.fact.answer_prefix}"

    def correct(self, text: str) -> bool:
        return self.fact.correct(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        rows = [r for f in args.replot.split(",") for r in json.loads(Path(f).read_text())["rows"]]
        print_table(rows)
        if args.plot:
            plot(rows, args.plot)
        return 0
    from memlong import MemLong

    docs, questions = corpus(args)
    ml = MemLong.from_pretrained(args.model, memory_capacity=131_072, local_window=args.window)
    if args.reader:
        from memlong.reader import attach_reader

        attach_reader(ml, args.reader)
    t0 = time.perf_counter()
    ml.ingest(docs, namespace=NS, context="chunk", progress=False)
    print(f"ingested {ml.bank.num_tokens(NS)} tokens in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows, trials = [], []
    for k in args.top_k:
        k_rows, k_trials = run_top_k(ml, args, questions, k)
        rows += k_rows
        trials += k_trials
    print_table(rows)
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("json", "plot")}
        config["methods"] = [m.name for m in args.methods]
        Path(args.json).write_text(json.dumps({"config": config, "rows": rows, "trials": trials}, indent=1))
    if args.plot:
        plot(rows, args.plot)
    return 0


NS = "fidelity"
STOP = ("\nQuestion:", "\nQ:", "\n\n")


def _read(ml, ids: list[int], memory, max_new_tokens: int, extra_s: float = 0.0):
    """First-answer-token log-probs, the greedy answer and the time to its first token (plus ``extra_s``)."""
    import torch

    with torch.no_grad():
        logits = ml.run(ids, memory=memory, logits_for=slice(-1, None)).logits[0, -1]
    g = ml.decode(ids, memory, max_new_tokens=max_new_tokens, stop=STOP)
    answer = g.text()
    return logits.log_softmax(-1), answer, extra_s + g.stats.time_to_first_token


@contextlib.contextmanager
def shared_positions(lengths: list[int]):
    """While inside: contexts with retrieved memory place chunk i (document order) at positions ``1..lengths[i]``,
    the sink at 0, and the new tokens at ``1 + max(lengths)``; everything else as the library builds it (APE from
    the config). With one chunk this is the ``continual`` layout exactly."""
    import torch

    import memlong.model as model
    from memlong.attention import rotate
    from memlong.positions import build_context, rope

    def shared(ml, memory=None, cache=None, *, capture=False, grow=False):
        if memory is None or cache:
            return build_context(ml, memory, cache, capture=capture, grow=grow)
        ctx, _ = build_context(ml, None, None, capture=capture, grow=grow)  # the sink alone
        positions = torch.cat([torch.arange(n) + 1 for n in lengths])
        if positions.numel() != memory[0].shape[2]:
            raise ValueError(f"chunk lengths {lengths} do not add up to the {memory[0].shape[2]} memory tokens.")
        cos, sin = rope(ml, positions)
        for layer in ml.config.retrieval_layers:
            src = ml.config.source_index(layer)
            keys = rotate(memory[0][src].unsqueeze(0), cos, sin)
            sink_k, sink_v = ctx.prefix[layer]
            ctx.prefix[layer] = (torch.cat([keys, sink_k], 2), torch.cat([memory[1][src].unsqueeze(0), sink_v], 2))
            ctx.memory_len[layer] = positions.numel()
        ape = (float(ml.config.memory_temperature), float(ml.config.memory_scale))
        ctx.reads_memory, ctx.ape = True, ape if ape != (1.0, 1.0) else None
        return ctx, 1 + max(lengths)

    model.build_context = shared
    try:
        yield
    finally:
        model.build_context = build_context


def _paste_text(texts: list[str], paste_as: str) -> str:
    if paste_as == "llama-index":  # PromptHelper.repack: "\n\n".join(t.strip() for t in texts if t.strip())
        return "\n\n".join(t.strip() for t in texts if t.strip())
    return "".join(texts)


def run_top_k(ml, args: argparse.Namespace, questions: list, k: int) -> tuple[list[dict], list[dict]]:
    """Every question at top-k ``k``, pasted and with every method: the summary rows and the per-question trials."""
    import torch

    from memlong.evaluation import answer_key

    base, order = ml.config, {c: i for i, c in enumerate(ml.bank.chunk_ids(NS))}
    per = {m.name: {"kl": [], "top1": 0, "agree": 0, "correct": 0, "encoded": [], "share": [], "ttft": []}
           for m in args.methods}
    pasted, paste_ttft, paste_correct, trials = [], [], 0, []
    for q in questions:
        hits = sorted((h.chunk_id for h in ml.bank.search(q.question, namespace=NS, k=k, count=False)),
                      key=order.__getitem__)
        text = _paste_text([ml.bank.get(c, namespace=NS).text for c in hits], args.paste_as)
        ml.config = base
        paste_ids = ml.encode_prompt(text + q.tail)
        pasted.append(len(paste_ids))
        paste_logp, paste_answer, ttft = _read(ml, paste_ids, None, args.max_new_tokens)
        paste_ttft.append(ttft)
        paste_correct += q.correct(paste_answer)
        trial = {"top_k": k, "question": q.question, "answer": q.answer, "fact_chunk_retrieved": q.answer in text,
                 "paste_answer": paste_answer, "kv_answers": {}}
        prompt = ml.encode_prompt(q.tail)
        stored = ml.memory_for(hits, NS)
        for m in args.methods:
            ml.config = dataclasses.replace(base, kv_refresh=m.kv_refresh, kv_reencode_head=m.kv_reencode_head,
                                            memory_temperature=m.memory_temperature, memory_scale=m.memory_scale,
                                            memory_reader=m.memory_reader)
            t1 = time.perf_counter()
            with torch.no_grad():
                memory, n = ml.refresh(stored, hits, NS) if m.kv_refresh or m.kv_reencode_head else (stored, 0)
            layout = shared_positions([ml.bank.get(c, namespace=NS).n_tokens for c in hits]) \
                if m.shared_positions else contextlib.nullcontext()
            with layout:
                kv_logp, kv_answer, ttft = _read(ml, prompt, memory, args.max_new_tokens, time.perf_counter() - t1)
            p = per[m.name]
            p["kl"].append(float(torch.sum(paste_logp.exp() * (paste_logp - kv_logp))))
            p["top1"] += int(kv_logp.argmax() == paste_logp.argmax())
            p["agree"] += int(answer_key(kv_answer) == answer_key(paste_answer))
            p["correct"] += q.correct(kv_answer)
            p["encoded"].append(len(prompt) + n)
            p["share"].append(n / int(stored[0].shape[2]))
            p["ttft"].append(ttft)
            trial["kv_answers"][m.name] = kv_answer
        trials.append(trial)
    ml.config = base
    nq, rows = len(questions), []
    for m in args.methods:
        p = per[m.name]
        rows.append({"corpus": args.corpus, "top_k": k, "method": m.name, **dataclasses.asdict(m), "questions": nq,
                     "kl_mean": statistics.fmean(p["kl"]), "first_token_agreement": p["top1"] / nq,
                     "answer_agreement": p["agree"] / nq, "kv_accuracy": p["correct"] / nq,
                     "paste_accuracy": paste_correct / nq, "tokens_encoded_mean": statistics.fmean(p["encoded"]),
                     "reencoded_share_mean": statistics.fmean(p["share"]),
                     "paste_tokens_encoded_mean": statistics.fmean(pasted),
                     "ttft_kv_median_s": statistics.median(p["ttft"]),
                     "ttft_paste_median_s": statistics.median(paste_ttft)})
        print(f"top-k {k}, {m.name}: KL {max(rows[-1]['kl_mean'], 0.0):.3f}, answers agree {p['agree']}/{nq}",
              file=sys.stderr)
    return rows, trials


def print_table(rows: list[dict]) -> None:
    print("| corpus | top-k | method | re-encoded share | tokens encoded / query (paste) | KL(paste ‖ kv) | same first "
          "token | same answer | accuracy K-V / paste | TTFT K-V / paste |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['corpus']} | {r['top_k']} | `{r['method']}` | {100 * r['reencoded_share_mean']:.0f} % | "
              f"{r['tokens_encoded_mean']:.1f} ({r['paste_tokens_encoded_mean']:.0f}) | {max(r['kl_mean'], 0.0):.3f} | "
              f"{100 * r['first_token_agreement']:.0f} % | {100 * r['answer_agreement']:.0f} % | "
              f"{100 * r['kv_accuracy']:.0f} % / {100 * r['paste_accuracy']:.0f} % | "
              f"{r['ttft_kv_median_s']:.2f} s / {r['ttft_paste_median_s']:.2f} s |")


def plot(rows: list[dict], path: str) -> None:
    """Answer agreement against tokens re-encoded per query, one panel per (corpus, top-k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["corpus"], r["top_k"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (name, k) in zip(axes[0], panels, strict=True):
        for r in (r for r in rows if (r["corpus"], r["top_k"]) == (name, k)):
            x = r["tokens_encoded_mean"]
            ax.scatter(x, 100 * r["answer_agreement"])
            ax.annotate(r["method"], (x, 100 * r["answer_agreement"]), fontsize=7)
        ax.set(title=f"{name}, top-k {k}", xlabel="tokens encoded per query (question + re-encoded)",
               ylabel="answers agreeing with pasted text (%)", ylim=(0, 105))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
