"""int8 K-V (KIVI layout) against float16 on the default model: planted-fact agreement, passkey, perplexity.

Paired, so that only the storage differs: every document is ingested once into a float16 bank and its chunks
are copied into an int8 bank (``MemoryBank(quantization="int8")``; with the default ``ingest_top_k=0`` the
stored K-V never depend on retrieval, so the copy holds exactly what an int8 ingestion stores). Then

* ``facts``: the planted-fact questions of ``benchmarks/kv_fidelity.py`` (top-k chunks, dense search) read
  as pasted text, as float16 K-V and as int8 K-V: answer agreement with the pasted answer for both, and
  float16-vs-int8 KL of the first answer token and answer agreement;
* ``passkey``: a 5-digit key hidden in Hamlet at a random depth, ``--passkey-length`` tokens, the key's
  chunk retrieved by the question; accuracy with float16 and with int8 K-V (same haystacks, same hits);
* ``ppl``: ``MemLong.perplexity`` of the last ``--score-last`` tokens of ``--ppl-tokens`` tokens of Macbeth
  with ``memory_quantization`` "none" and "int8" (two models, same weights).

    python benchmarks/int8_kv.py --json results/int8-kv.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch


def mirror(src, dst, namespace: str, chunk_ids: list[str] | None = None) -> dict[str, str]:
    """Copy chunks (text, span, tokens, K-V; every chunk of ``namespace`` by default) from ``src`` into ``dst``
    (which quantizes them as it is set to); returns source id -> copy id. K-V are read with ``fetch``, which lets
    a disk bank's pages go again. The copy embeds the texts again (a bank's embeddings are not public)."""
    ids = src.chunk_ids(namespace) if chunk_ids is None else list(chunk_ids)
    chunks = [src.get(c, namespace=namespace) for c in ids]
    kv = [src.fetch([c], namespace=namespace) for c in ids]
    copies = dst.add_chunks([c.text for c in chunks], keys=[k for k, _ in kv], values=[v for _, v in kv],
                            namespace=namespace, doc_ids=[c.doc_id for c in chunks], spans=[c.span for c in chunks],
                            tokens=[c.tokens for c in chunks], atomic=True)
    return dict(zip(ids, copies))


def with_bank(ml, bank, fn):
    own, ml.bank = ml.bank, bank
    try:
        return fn()
    finally:
        ml.bank = own


def facts(ml, q8, args) -> dict:
    from memlong.evaluation import answer_key, planted_fact_documents

    docs, planted = planted_fact_documents(args.facts, plays=tuple(args.plays.split(",")), chars=args.chars, seed=0,
                                           distinct=True)
    ns = "facts"
    ml.ingest(docs, namespace=ns, context="chunk", progress=False)
    copy = mirror(ml.bank, q8, ns)
    order = {c: i for i, c in enumerate(ml.bank.chunk_ids(ns))}
    stop = ("\nQuestion:", "\n\n")

    def read(ids, memory):
        with torch.no_grad():
            logits = ml.run(ids, memory=memory, logits_for=slice(-1, None)).logits[0, -1]
        return logits.log_softmax(-1), answer_key(ml.decode(ids, memory, max_new_tokens=12, stop=stop).text())

    tally = {"fp16_agree": 0, "int8_agree": 0, "int8_vs_fp16_agree": 0, "kl": [], "fp16_correct": 0, "int8_correct": 0}
    for fact in planted:
        hits = sorted((h.chunk_id for h in ml.bank.search(fact.question, namespace=ns, k=args.top_k, count=False)),
                      key=order.__getitem__)
        tail = f"\nQuestion: {fact.question}\nAnswer: {fact.answer_prefix}"
        _, paste = read(ml.encode_prompt("".join(ml.bank.get(c, namespace=ns).text for c in hits) + tail), None)
        prompt = ml.encode_prompt(tail)
        lp16, a16 = read(prompt, ml.memory_for(hits, ns))
        lp8, a8 = with_bank(ml, q8, lambda: read(prompt, ml.memory_for([copy[c] for c in hits], ns)))  # noqa: B023
        tally["fp16_agree"] += a16 == paste
        tally["int8_agree"] += a8 == paste
        tally["int8_vs_fp16_agree"] += a8 == a16
        tally["kl"].append(float(torch.sum(lp16.exp() * (lp16 - lp8))))
        tally["fp16_correct"] += fact.correct(a16)
        tally["int8_correct"] += fact.correct(a8)
    n = len(planted)
    return {"questions": n, "top_k": args.top_k, "fp16_answer_agreement": tally["fp16_agree"] / n,
            "int8_answer_agreement": tally["int8_agree"] / n, "int8_vs_fp16_same_answer": tally["int8_vs_fp16_agree"] / n,
            "kl_fp16_int8_first_token_mean": statistics.fmean(tally["kl"]),
            "fp16_correct": tally["fp16_correct"] / n, "int8_correct": tally["int8_correct"] / n}


def passkey(ml, q8, args) -> dict:
    """Paired passkey trials; every haystack is asked at each ``--passkey-top-k`` (ingestion is the cost)."""
    from memlong.evaluation import fact_rank, shakespeare_text

    filler = ml.tokenize(shakespeare_text("hamlet"))
    rng = random.Random(args.seed)
    ks = [int(k) for k in (args.passkey_top_k or str(args.top_k)).split(",")]
    right = {(k, name): 0 for k in ks for name in ("fp16", "int8")}
    same = dict.fromkeys(ks, 0)
    retrieved = dict.fromkeys(ks, 0)
    question = "What is the pass key?"
    trials = []
    for trial in range(args.passkey_trials):
        key = str(rng.randrange(10_000, 100_000))
        start = rng.randrange(0, len(filler) - args.passkey_length)
        body = filler[start:start + args.passkey_length - 40]
        cut = int(len(body) * rng.random())
        text = (ml.tokenizer.decode(body[:cut]) + f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
                + ml.tokenizer.decode(body[cut:]))
        ns = f"passkey-{trial}"
        ml.ingest(text, namespace=ns, progress=False)
        copy = mirror(ml.bank, q8, ns)
        prompt = ml.encode_prompt(f"\nQuestion: {question}\nAnswer: The pass key is")
        for k in ks:
            hits = [h.chunk_id for h in ml.bank.search(question, namespace=ns, k=k, count=False)]
            rank = fact_rank([ml.bank.get(c, namespace=ns).text for c in hits], key)
            retrieved[k] += rank is not None
            answers = {}
            for name, bank, ids in (("fp16", ml.bank, hits), ("int8", q8, [copy[c] for c in hits])):
                answers[name] = with_bank(ml, bank, lambda: ml.decode(prompt, ml.memory_for(ids, ns),  # noqa: B023
                                                                      max_new_tokens=8).text())
                found = re.search(r"\d+", answers[name])
                right[k, name] += int(found is not None and found.group() == key)
            same[k] += answers["fp16"] == answers["int8"]
            trials.append({"trial": trial, "top_k": k, "depth": cut / len(body), "key": key,
                           "key_rank": rank, **answers})
        ml.bank.reset(ns)
        q8.reset(ns)
    n = args.passkey_trials
    by_k = {k: {"key_chunk_retrieved": retrieved[k] / n, "fp16_accuracy": right[k, "fp16"] / n,
                "int8_accuracy": right[k, "int8"] / n, "same_answer": same[k] / n} for k in ks}
    # the first k's figures also at the top level, under the record's original field names
    return {"length": args.passkey_length, "trials": n, "seed": args.seed, "top_k": ks[0], **by_k[ks[0]],
            "by_top_k": by_k, "per_trial": trials}


def ppl(args) -> dict:
    from memlong import MemLong
    from memlong.evaluation import shakespeare_text

    out = {}
    for quant in ("none", "int8"):
        ml = MemLong.from_pretrained("default", memory_quantization=quant, memory_capacity=131_072)
        ids = ml.tokenize(shakespeare_text("macbeth"))[:args.ppl_tokens]
        out[quant] = ml.perplexity(ids, score_last=args.score_last)["ppl"]
        del ml
    return {"tokens": args.ppl_tokens, "score_last": args.score_last, "fp16_ppl": out["none"],
            "int8_ppl": out["int8"], "relative_change": out["int8"] / out["none"] - 1}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benches", default="facts,passkey,ppl", help="comma-separated subset of facts,passkey,ppl")
    p.add_argument("--facts", type=int, default=30)
    p.add_argument("--plays", default="hamlet,macbeth,othello,lear,romeo_and_juliet,twelfth_night")
    p.add_argument("--chars", type=int, default=8_000)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--passkey-length", type=int, default=4096)
    p.add_argument("--passkey-trials", type=int, default=20)
    p.add_argument("--passkey-top-k", default=None,
                   help="comma-separated chunks retrieved per passkey question, each asked on the same haystacks "
                        "(default: --top-k)")
    p.add_argument("--ppl-tokens", type=int, default=8192)
    p.add_argument("--score-last", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0, help="passkey haystacks and keys")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from memlong import MemLong, MemoryBank

    result = {"benchmark": "int8-kv", "args": vars(args) | {"json": str(args.json)},
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": "2-core CPU shared with other jobs (contended)"}
    benches = [b for b in args.benches.split(",") if b]
    if not benches or set(benches) - {"facts", "passkey", "ppl"}:
        p.error(f"--benches {args.benches!r}: choose a comma-separated subset of facts,passkey,ppl")
    if {"facts", "passkey"} & set(benches):
        ml = MemLong.from_pretrained("default", memory_capacity=131_072)
        q8 = MemoryBank(embedder=ml.bank.embedder, capacity=131_072, quantization="int8")
        for name, fn in (("facts", facts), ("passkey", passkey)):
            if name in benches:
                t0 = time.perf_counter()
                result[name] = fn(ml, q8, args) | {"seconds": time.perf_counter() - t0}
                print(name, json.dumps(result[name]), file=sys.stderr, flush=True)
                if args.json:
                    args.json.write_text(json.dumps(result, indent=1))
    if "ppl" in benches:
        result["ppl"] = ppl(args)
        print("ppl", json.dumps(result["ppl"]), file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
