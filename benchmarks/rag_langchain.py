"""LangChain RAG with MemLong: retrieved chunks as K-V versus the same chain pasting the retrieved text.

Planted-fact documents (``memlong.evaluation.planted_fact_documents``) go into a ``MemLongVectorStore``
(K-V computed while streaming each document); a ``MemLongRetriever`` finds ``top_k`` chunks per question; the
same ``create_memlong_rag_chain`` then answers

* ``kv``: chunks reach ``ChatMemLong`` as ``memlong_chunk_ids`` (only the question is encoded),
* ``paste``: the same chunks' text is pasted into the prompt (``paste=True``), no memory attended,
* ``kv-chat`` (optional): like ``kv`` but with the chat template between memory and question,
* ``none`` (optional): no retrieved context at all (does the model know the facts without memory?).

``--search-mode`` picks the retriever's ranking (dense, BM25 or hybrid); ``--kv-refresh`` re-encodes a share of
the retrieved tokens (``MemLongConfig.kv_refresh``; counted in tokens encoded).

Both ``kv`` and ``paste`` use the plain continuation prompt (``prompt_format="plain"``) and the fact's answer
prefix as an AI prefill. Per mode: tokens encoded per query, time to first token (model side, from
``MemLong.last_generation``), accuracy, and agreement of ``kv`` with ``paste``
(same first clause, ``memlong.evaluation.answer_key``; also reported: same first line).

Why answers fail: every question records ``fact_rank``, the 1-based rank of the chunk holding the fact's answer
among the retrieved (``None``: not retrieved), and each mode's answer; the summary splits each mode's failures
into retrieval misses (the fact's chunk was not retrieved) and reading misses (it was, the answer is still wrong).

    python benchmarks/rag_langchain.py --facts 30 --json results/rag-langchain.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

from memlong.cli_args import int_at_least

MODES = ("kv", "paste", "kv-chat", "none")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="MemLong model (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--facts", type=int_at_least(1), default=30, metavar="N",
                   help="planted facts / questions (default 30)")
    p.add_argument("--plays", default="hamlet,macbeth,othello,lear,romeo_and_juliet,twelfth_night",
                   help="comma-separated plays used as documents")
    p.add_argument("--chars", type=int, default=20_000, help="characters of each play (default 20000)")
    p.add_argument("--memory-capacity", type=int, default=131_072,
                   help="tokens the bank may hold before it evicts (default 131072: every document stays; the library "
                        "default of 32768 would evict part of the default corpus, and with it facts)")
    p.add_argument("--top-k", type=int, default=4, help="chunks retrieved per question (default 4)")
    p.add_argument("--chunk-size", type=int, default=128, help="tokens per stored (and retrieved) chunk (default 128)")
    p.add_argument("--chunk-context", choices=("chunk", "document"), default="chunk",
                   help="K-V of each stored chunk computed from the chunk alone (default, as pasting it would) or "
                        "inside its document's sliding window (the paper's streaming)")
    p.add_argument("--search-mode", choices=("dense", "lexical", "hybrid"), default="dense",
                   help="how the retriever ranks chunks: embeddings (default), BM25, or both fused by reciprocal rank")
    p.add_argument("--kv-refresh", type=float, default=0.0,
                   help="share of retrieved tokens re-encoded with the chunks before them (MemLongConfig.kv_refresh; "
                        "default 0: K-V used as stored); counted in the kv row's tokens encoded")
    p.add_argument("--kv-reencode-head", type=int, default=0,
                   help="tokens re-encoded at the start of every retrieved chunk (MemLongConfig.kv_reencode_head, "
                        "EPIC; default 0; `memlong demo` uses 32); counted in the K-V rows' tokens encoded")
    p.add_argument("--max-new-tokens", type=int, default=12, help="answer budget (default 12)")
    p.add_argument("--modes", default="kv,paste,kv-chat,none", help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--dense", action="store_true",
                   help="the earlier, harder fact set: values repeat across facts and depths are uniform, so one "
                        "retrieved chunk can hold several look-alike facts (default: distinct answers, spaced facts)")
    p.add_argument("--seed", type=int, default=0, help="planted-fact seed")
    p.add_argument("--json", metavar="OUT", help="write the summary and per-question records here (rewritten as it runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while ingesting")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad or "kv" not in args.modes:
        p.error(f"--modes must include kv and be drawn from {MODES}; got {args.modes}")
    return args


def summarise(records: list[dict], modes: list[str]) -> list[dict]:
    from memlong.evaluation import answer_key, miss_counts

    rows = []
    for mode in modes:
        rs = [r[mode] for r in records if mode in r]
        if not rs:
            continue
        row = {"mode": mode, "questions": len(rs),
               "prompt_tokens_mean": statistics.mean(r["prompt_tokens"] for r in rs),
               "memory_tokens_mean": statistics.mean(r["memory_tokens"] for r in rs),
               "ttft_median_s": statistics.median(r["time_to_first_token"] for r in rs),
               "accuracy": sum(r["correct"] for r in rs) / len(rs)}
        if mode != "none":  # reads the retrieved chunks: a wrong answer is a retrieval or a reading miss
            misses = miss_counts([{"correct": r[mode]["correct"], "needle_seen": r["fact_retrieved"]}
                                  for r in records if mode in r])
            row.update(retrieval_misses=misses["retrieval"], reading_misses=misses["reading"])
        if mode != "kv":
            pairs = [(r["kv"], r[mode]) for r in records if mode in r]
            row["agreement_with_kv"] = sum(answer_key(a["answer"]) == answer_key(b["answer"]) for a, b in pairs) / len(pairs)
            row["agreement_with_kv_first_line"] = sum(answer_key(a["answer"], clause=False) == answer_key(
                b["answer"], clause=False) for a, b in pairs) / len(pairs)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| mode | questions | tokens encoded / query | memory tokens (K-V) / query | time to first token (median) "
             "| accuracy | answer agreement with kv |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        agree = f"{100 * r['agreement_with_kv']:.0f} %" if "agreement_with_kv" in r else "—"
        lines.append(f"| {r['mode']} | {r['questions']} | {r['prompt_tokens_mean']:.1f} | {r['memory_tokens_mean']:.0f} | "
                     f"{r['ttft_median_s']:.2f} s | {100 * r['accuracy']:.0f} % | {agree} |")
    return "\n".join(lines)


def failure_lines(rows: list[dict]) -> list[str]:
    """One line per mode that read the retrieved chunks: how many answers failed, and why."""
    from memlong.evaluation import describe_misses

    return [f"{r['mode']}: {r['retrieval_misses'] + r['reading_misses']}/{r['questions']} wrong: "
            + describe_misses({"retrieval": r["retrieval_misses"], "reading": r["reading_misses"]})
            for r in rows if "retrieval_misses" in r]



def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from langchain_core.prompts import ChatPromptTemplate

    from memlong import MemLong, MemoryEvictionWarning
    from memlong.evaluation import fact_rank, planted_fact_documents
    from memlong_integrations.langchain import ChatMemLong, MemLongRetriever, MemLongVectorStore, create_memlong_rag_chain

    docs, facts = planted_fact_documents(args.facts, plays=tuple(args.plays.split(",")), chars=args.chars, seed=args.seed,
                                         distinct=not args.dense)
    warnings.simplefilter("error", MemoryEvictionWarning)  # an evicted fact would make the comparison meaningless
    ml = MemLong.from_pretrained(args.model, top_k=args.top_k, memory_capacity=args.memory_capacity,
                                 chunk_size=args.chunk_size, kv_refresh=args.kv_refresh,
                                 kv_reencode_head=args.kv_reencode_head)
    namespace = "rag-langchain"
    store = MemLongVectorStore(ml, namespace=namespace, progress=not args.no_progress, chunk_context=args.chunk_context)
    t0 = time.perf_counter()
    store.add_texts(docs, metadatas=[{"play": p} for p in args.plays.split(",")])
    ingest = {"documents": len(docs), "tokens": ml.bank.num_tokens(namespace),
              "chunks": len(ml.bank.chunk_ids(namespace)), "seconds": time.perf_counter() - t0}
    print(f"ingested {ingest['tokens']} tokens in {ingest['chunks']} chunks, {ingest['seconds']:.0f} s", file=sys.stderr)

    retriever = MemLongRetriever(bank=ml.bank, namespace=namespace, k=args.top_k, count_retrievals=False,
                                 search_mode=args.search_mode)
    qa = [("human", "{question}"), ("ai", "{answer_prefix}")]
    plain = ChatMemLong(memlong=ml, namespace=namespace, max_tokens=args.max_new_tokens, prompt_format="plain")
    chat = ChatMemLong(memlong=ml, namespace=namespace, max_tokens=args.max_new_tokens, prompt_format="chat")
    chains = {"kv": create_memlong_rag_chain(retriever, plain, ChatPromptTemplate.from_messages(qa)),
              "paste": create_memlong_rag_chain(retriever, plain, ChatPromptTemplate.from_messages(
                  [("system", "{context}"), *qa]), paste=True),
              "kv-chat": create_memlong_rag_chain(retriever, chat, ChatPromptTemplate.from_messages(qa))}

    def out_record(mode: str, answer: str, fact) -> dict:
        g = ml.last_generation
        return {"answer": answer, "correct": fact.correct(answer), "prompt_tokens": g.prompt_tokens + g.refreshed_tokens,
                "refreshed_tokens": g.refreshed_tokens,
                "memory_tokens": g.memory_tokens, "time_to_first_token": g.time_to_first_token,
                "chunk_ids": list(g.chunk_ids)}

    records: list[dict] = []
    config = {k: v for k, v in vars(args).items() if k != "json"}
    for i, fact in enumerate(facts):
        question = {"question": fact.question, "answer_prefix": fact.answer_prefix}
        context = retriever.invoke(fact.question)
        rank = fact_rank([d.page_content for d in context], fact.answer)  # the retriever's order: best first
        record = {"question": fact.question, "answer": fact.answer, "fact_retrieved": rank is not None,
                  "fact_rank": rank}
        order = args.modes if i % 2 == 0 else list(reversed(args.modes))  # alternate: fair under shared CPUs
        for mode in order:
            if mode == "none":
                msg = plain.invoke([("human", fact.question), ("ai", fact.answer_prefix)], memlong_chunk_ids=[])
                record[mode] = out_record(mode, msg.content, fact)
                continue
            out = chains[mode].invoke(question)
            record[mode] = out_record(mode, out["answer"], fact)
            record[mode]["retrieved"] = [d.id for d in out["context"]]
        if "paste" in record:  # the comparison is only fair on the same chunks
            assert record["paste"]["retrieved"] == record["kv"]["retrieved"], "kv and paste retrieved different chunks"
        records.append(record)
        print(f"[{i + 1}/{len(facts)}] {fact.answer!r} (fact's chunk at rank {rank}): " + "; ".join(
            f"{m}={record[m]['answer'].strip()[:40]!r}" for m in args.modes), file=sys.stderr)
        if args.json:
            Path(args.json).write_text(json.dumps({"config": config, "ingest": ingest, "partial": True,
                                                   "summary": summarise(records, args.modes), "records": records}, indent=1))
    rows = summarise(records, args.modes)
    print(table(rows))
    print("\n".join(["", *failure_lines(rows)]))
    print(f"\nfact's chunk retrieved for {sum(r['fact_retrieved'] for r in records)}/{len(records)} questions; "
          f"ingest {ingest['tokens']} tokens, {ingest['chunks']} chunks, {ingest['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": config, "ingest": ingest, "partial": False, "summary": rows,
                                               "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
