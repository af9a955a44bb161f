"""How close retrieved K-V come to pasting the same chunks' text, as a function of top-k and ``kv_refresh``.

No framework and no retriever choice in the way: for each planted-fact question the same ``top_k`` chunks
(dense search) are read two ways by the default model,

* ``paste``: ``[sink] + chunk texts + "\\nQuestion: ...\\nAnswer: <prefix>"`` encoded as text;
* ``kv``: ``[sink] + stored chunk-alone K-V + "\\nQuestion: ...\\nAnswer: <prefix>"`` with ``kv_refresh`` = r
  (that share of the retrieved tokens re-encoded with the chunks before them; ``1`` re-encodes all of them).

Per setting: KL(paste || kv) of the first answer token's distribution, how often the first token and the
greedy 12-token answer agree (``memlong.evaluation.answer_key``), and the tokens encoded per query.

    python benchmarks/kv_fidelity.py --top-k 1,4 --refresh 0,0.25,0.5,1 --json results/kv-fidelity.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="MemLong model (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--facts", type=int, default=30, help="planted facts / questions (default 30)")
    p.add_argument("--plays", default="hamlet,macbeth,othello,lear,romeo_and_juliet,twelfth_night")
    p.add_argument("--chars", type=int, default=20_000, help="characters of each play (default 20000)")
    p.add_argument("--top-k", default="1,4", help="comma-separated chunk counts (default 1,4)")
    p.add_argument("--refresh", default="0,0.25,0.5,1", help="comma-separated kv_refresh shares (default 0,0.25,0.5,1)")
    p.add_argument("--paste-as", choices=("text", "llama-index"), default="text",
                   help="how the chunks are pasted: their texts joined as stored (default; what create_memlong_rag_chain "
                        "pastes) or stripped and joined by blank lines, as LlamaIndex's compact/refine synthesizers "
                        "repack them")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--json", metavar="OUT", help="write the table rows here")
    args = p.parse_args(argv)
    args.top_k = [int(x) for x in args.top_k.split(",")]
    args.refresh = [float(x) for x in args.refresh.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from memlong import MemLong
    from memlong.evaluation import answer_key, planted_fact_documents

    plays = tuple(args.plays.split(","))
    docs, facts = planted_fact_documents(args.facts, plays=plays, chars=args.chars, seed=0, distinct=True)
    ml = MemLong.from_pretrained(args.model, memory_capacity=131_072)
    ns = "fidelity"
    t0 = time.perf_counter()
    ml.ingest(docs, namespace=ns, context="chunk", progress=False)
    print(f"ingested {ml.bank.num_tokens(ns)} tokens in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    order = {c: i for i, c in enumerate(ml.bank.chunk_ids(ns))}
    stop = ("\nQuestion:", "\n\n")

    def read(ids: list[int], memory) -> tuple[torch.Tensor, str]:
        with torch.no_grad():
            logits = ml.run(ids, memory=memory, logits_for=slice(-1, None)).logits[0, -1]
        answer = ml.decode(ids, memory, max_new_tokens=args.max_new_tokens, stop=stop).text()
        return logits.log_softmax(-1), answer_key(answer)

    rows = []
    for k in args.top_k:
        per = {r: {"kl": [], "top1": 0, "agree": 0, "encoded": []} for r in args.refresh}
        pasted: list[int] = []
        for fact in facts:
            hits = sorted((h.chunk_id for h in ml.bank.search(fact.question, namespace=ns, k=k, count=False)),
                          key=order.__getitem__)
            tail = f"\nQuestion: {fact.question}\nAnswer: {fact.answer_prefix}"
            texts = [ml.bank.get(c, namespace=ns).text for c in hits]
            if args.paste_as == "llama-index":  # PromptHelper.repack: "\n\n".join(t.strip() for t in texts if t.strip())
                text = "\n\n".join(t.strip() for t in texts if t.strip())
            else:
                text = "".join(texts)
            paste_ids = ml.encode_prompt(text + tail)
            pasted.append(len(paste_ids))
            paste_logp, paste_answer = read(paste_ids, None)
            prompt = ml.encode_prompt(tail)
            stored = ml.memory_for(hits, ns)
            for share in args.refresh:
                with torch.no_grad():
                    memory, n = ml.refresh(stored, hits, ns, share) if share > 0 else (stored, 0)
                kv_logp, kv_answer = read(prompt, memory)
                p = per[share]
                p["kl"].append(float(torch.sum(paste_logp.exp() * (paste_logp - kv_logp))))
                p["top1"] += int(kv_logp.argmax() == paste_logp.argmax())
                p["agree"] += int(kv_answer == paste_answer)
                p["encoded"].append(len(prompt) + n)
        for share, p in per.items():
            rows.append({"top_k": k, "kv_refresh": share, "questions": len(facts), "kl_mean": statistics.fmean(p["kl"]),
                         "first_token_agreement": p["top1"] / len(facts), "answer_agreement": p["agree"] / len(facts),
                         "tokens_encoded_mean": statistics.fmean(p["encoded"]),
                         "paste_tokens_encoded_mean": statistics.fmean(pasted)})
            print(f"top-k {k}, kv_refresh {share}: KL {rows[-1]['kl_mean']:.3f}, "
                  f"answers agree {p['agree']}/{len(facts)}", file=sys.stderr)
    print("| top-k | kv_refresh | tokens encoded / query (paste) | KL(paste ‖ kv), first answer token "
          "| same first token | same answer |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['top_k']} | {r['kv_refresh']:g} | {r['tokens_encoded_mean']:.1f} "
              f"({r['paste_tokens_encoded_mean']:.0f}) | "
              f"{r['kl_mean']:.3f} | "
              f"{100 * r['first_token_agreement']:.0f} % | {100 * r['answer_agreement']:.0f} % |")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": {k: v for k, v in vars(args).items() if k != "json"},
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
