"""Where retrieved chunks sit: consecutive positions (the library's ``continual`` layout) or all at one offset.

Issue 15 asks for both position schemes of multi-chunk reading to be measured. ``continual`` places the retrieved
chunks one after another (sink at 0, chunks at ``1..M`` in document order, the question after them), as pasting
their text would. ``shared`` (Parallel Context Windows, Ratner et al. 2023; APE, Yang et al. 2025) places every
chunk at ``1..len(chunk)`` -- the positions its chunk-alone K-V were computed at -- and the question after the
longest chunk, so no chunk is moved and all are equally far from the question. ``shared+ape`` adds APE's
temperature and scale (0.9 / 0.9, ``memory_temperature`` / ``memory_scale``).

``shared`` is not a library option: this script builds it by giving ``MemLong`` a context builder that rotates
each chunk's stored keys from position 1 (``_shared_positions``); with one chunk it is ``continual`` exactly (the
smoke test checks that). Against pasting the same chunks' text (as ``benchmarks/kv_fidelity.py`` does, chunk-alone
K-V, a 2,048-token window): first-answer-token KL, first-token and answer agreement, both sides' accuracy.

    python benchmarks/kv_positions.py --facts 20 --top-k 4,8 --json results/kv-positions-planted.json
    python benchmarks/kv_positions.py --corpus gazetteer --facts 24 --top-k 4,8 --json results/kv-positions-gazetteer.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kv_fidelity as kf  # noqa: E402  (sets HF_HUB_OFFLINE and the benchmarks path first)

LAYOUTS = ("continual", "shared", "shared+ape")


@contextlib.contextmanager
def _shared_positions(lengths: list[int], ape: tuple[float, float] | None):
    """While inside: contexts with retrieved memory place chunk i at positions ``1..lengths[i]`` (the sink at 0)
    and the new tokens at ``1 + max(lengths)``; everything else as the library builds it."""
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
        ctx.reads_memory, ctx.ape = True, ape
        return ctx, 1 + max(lengths)

    model.build_context = shared
    try:
        yield
    finally:
        model.build_context = build_context


def run_top_k(ml, questions: list, k: int, max_new_tokens: int, corpus_name: str) -> tuple[list[dict], list[dict]]:
    """Every question at top-k ``k``: pasted, then read in each layout."""
    import torch

    from memlong.evaluation import answer_key

    order = {c: i for i, c in enumerate(ml.bank.chunk_ids(kf.NS))}
    per = {name: {"kl": [], "top1": 0, "agree": 0, "correct": 0} for name in LAYOUTS}
    paste_correct, trials = 0, []
    for q in questions:
        hits = sorted((h.chunk_id for h in ml.bank.search(q.question, namespace=kf.NS, k=k, count=False)),
                      key=order.__getitem__)
        text = kf._paste_text([ml.bank.get(c, namespace=kf.NS).text for c in hits], "text")
        paste_logp, paste_answer, _ = kf._read(ml, ml.encode_prompt(text + q.tail), None, max_new_tokens)
        paste_correct += q.correct(paste_answer)
        prompt, memory = ml.encode_prompt(q.tail), ml.memory_for(hits, kf.NS)
        lengths = [ml.bank.get(c, namespace=kf.NS).n_tokens for c in hits]  # document order, as fetched
        trial = {"top_k": k, "question": q.question, "paste_answer": paste_answer, "answers": {}}
        for name in LAYOUTS:
            shared = _shared_positions(lengths, (0.9, 0.9) if name.endswith("ape") else None)
            with shared if name != "continual" else contextlib.nullcontext():
                logp, answer, _ = kf._read(ml, prompt, memory, max_new_tokens)
            p = per[name]
            p["kl"].append(float(torch.sum(paste_logp.exp() * (paste_logp - logp))))
            p["top1"] += int(logp.argmax() == paste_logp.argmax())
            p["agree"] += int(answer_key(answer) == answer_key(paste_answer))
            p["correct"] += q.correct(answer)
            trial["answers"][name] = answer
        trials.append(trial)
    n = len(questions)
    rows = [{"corpus": corpus_name, "top_k": k, "layout": name, "questions": n,
             "kl_mean": statistics.fmean(p["kl"]), "first_token_agreement": p["top1"] / n,
             "answer_agreement": p["agree"] / n, "kv_accuracy": p["correct"] / n, "paste_accuracy": paste_correct / n}
            for name, p in per.items()]
    return rows, trials


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", choices=("planted", "gazetteer"), default="planted")
    p.add_argument("--facts", type=int, default=20)
    p.add_argument("--plays", default="hamlet,macbeth,othello,lear,romeo_and_juliet,twelfth_night")
    p.add_argument("--chars", type=int, default=20_000)
    p.add_argument("--top-k", default="4,8", help="comma-separated chunk counts")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--json", metavar="OUT")
    a = p.parse_args(argv)
    args = kf.parse_args(["--corpus", a.corpus, "--facts", str(a.facts), "--plays", a.plays, "--chars",
                          str(a.chars), "--top-k", a.top_k, "--methods", "kv"])
    from memlong import MemLong

    docs, questions = kf.corpus(args)
    ml = MemLong.from_pretrained("default", memory_capacity=131_072, local_window=args.window)
    ml.ingest(docs, namespace=kf.NS, context="chunk", progress=False)
    rows, trials = [], []
    for k in args.top_k:
        k_rows, k_trials = run_top_k(ml, questions, k, a.max_new_tokens, a.corpus)
        rows += k_rows
        trials += k_trials
    print("| top-k | layout | KL | first token agrees | answer agrees | K-V accuracy | pasted accuracy |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['top_k']} | {r['layout']} | {r['kl_mean']:.3f} | {r['first_token_agreement']:.0%} | "
              f"{r['answer_agreement']:.0%} | {r['kv_accuracy']:.0%} | {r['paste_accuracy']:.0%} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"config": vars(a), "rows": rows, "trials": trials}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
