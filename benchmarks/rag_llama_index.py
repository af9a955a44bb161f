"""K-V injection vs. the stock LlamaIndex text pipeline: same model, same questions, same retrieved chunks.

Facts are planted at random depths of long Shakespeare plays (``memlong.evaluation.planted_fact_documents``).
The plays go into a ``VectorStoreIndex`` over :class:`MemLongVectorStore` (chunk K-V computed once, at
ingestion). For every question one stock retriever (``index.as_retriever``) feeds two query engines:

* ``kv``   — ``MemLongQueryEngine``: the retrieved chunk ids go to :class:`MemLongLLM`, the prompt holds only
  the question; the chunks enter attention as stored K-V.
* ``text`` — ``RetrieverQueryEngine.from_args`` (stock compact synthesizer) with the same model through
  :class:`MemLongLLM` (``retrieve=False``, so it sees nothing but the prompt): the retrieved text is pasted into
  the prompt and encoded again.

Both prompts end the same way, ``"\\nQuestion: {q}\\nAnswer: {answer_prefix}"``; the text prompt starts with
the retrieved chunks. Two more rows answer through the LLM's chat path (``chat``) with the same chunk ids, with
the tokenizer's chat template and with a plain transcript, to show how the prompt format affects a small model.

Measured per query: tokens the model encoded (summed over every LLM call the engine made), time to first
token (``MemLong.last_generation``: from the LLM call to the first generated token), answers, accuracy, and
whether both engines saw the same chunks. Why answers fail: ``fact_rank`` is the 1-based rank (by retrieval
score) of the chunk holding the fact's answer among the retrieved (``None``: not retrieved; ``fact_retrieved`` is
``fact_rank is not None``; runs before 6 December 2026 required the whole planted sentence in one chunk), and each
pipeline's wrong answers are split into retrieval misses (the fact's chunk was not retrieved) and reading misses
(it was, and the answer is still wrong).

Example:
    python benchmarks/rag_llama_index.py --facts 30 --json results/rag-llama-index.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from memlong.cli_args import int_at_least

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="default", help="MemLong.from_pretrained name or path")
    p.add_argument("--facts", type=int_at_least(1), default=30, metavar="N", help="planted facts = questions")
    p.add_argument("--plays", default="hamlet,macbeth,othello,lear,romeo_and_juliet,twelfth_night",
                   help="comma-separated plays (documents)")
    p.add_argument("--chars", type=int, default=20_000, help="characters of each play (default 20000)")
    p.add_argument("--dense", action="store_true",
                   help="the earlier, harder fact set: values repeat across facts and depths are uniform, so one "
                        "retrieved chunk can hold several look-alike facts (default: distinct answers, spaced facts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-capacity", type=int, default=131_072,
                   help="tokens the bank may hold before it evicts (default 131072: every document stays; the library "
                        "default of 32768 would evict part of the default corpus, and with it facts)")
    p.add_argument("--top-k", type=int, default=4, help="chunks retrieved per question")
    p.add_argument("--chunk-size", type=int, default=128, help="tokens per stored (and retrieved) chunk (default 128)")
    p.add_argument("--chunk-context", choices=("chunk", "document"), default="chunk",
                   help="K-V of each stored chunk computed from the chunk alone (default, as pasting it would) or "
                        "inside its document's sliding window (the paper's streaming)")
    p.add_argument("--search-mode", choices=("dense", "lexical", "hybrid"), default="dense",
                   help="retriever ranking (vector_store_query_mode default / text_search / hybrid): embeddings, BM25, "
                        "or both fused by reciprocal rank")
    p.add_argument("--kv-refresh", type=float, default=0.0,
                   help="share of retrieved tokens the K-V pipeline re-encodes with the chunks before them "
                        "(MemLongConfig.kv_refresh; counted in its tokens encoded)")
    p.add_argument("--kv-reencode-head", type=int, default=0,
                   help="tokens re-encoded at the start of every retrieved chunk (MemLongConfig.kv_reencode_head, "
                        "EPIC; default 0; `memlong demo` uses 32); counted in the K-V rows' tokens encoded")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--split", action="store_true",
                   help="split documents with LlamaIndex's default SentenceSplitter (default: one node per document, "
                        "so chunk K-V sees the whole document's context)")
    p.add_argument("--text-mode", default="compact", choices=["compact", "simple_summarize"],
                   help="response mode of the stock text pipeline: compact (LlamaIndex's default; reserves 500 tokens "
                        "for the answer, so the retrieved text can spill into refine calls) or simple_summarize "
                        "(one call with all the retrieved text)")
    p.add_argument("--no-chat", action="store_true", help="skip the two chat-path rows")
    p.add_argument("--json", metavar="OUT", help="write config, summary and per-question records here (updated "
                                                 "after every question)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--from-json", metavar="IN", help="print the table of a saved --json file and exit (no model run); "
                                                    "with --json, rewrite that file's summary")
    return p.parse_args(argv)


def llm_calls(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Generation stats of every LLM call logged since the last look (and clear the log)."""
    calls = list(log)
    log.clear()
    return calls


def logging_llm(log: list[dict[str, Any]]) -> type:
    """MemLongLLM that appends each call's generation stats (``MemLong.last_generation``) to ``log``."""
    from memlong_integrations.llama_index import MemLongLLM

    class LoggingMemLongLLM(MemLongLLM):
        def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
            response = super().complete(prompt, formatted, **kwargs)
            log.append(dict(response.additional_kwargs, text=response.text))
            return response

        def chat(self, messages: Any, **kwargs: Any) -> Any:
            response = super().chat(messages, **kwargs)
            log.append(dict(response.additional_kwargs, text=response.message.content or ""))
            return response

    return LoggingMemLongLLM


def summarise(records: list[dict[str, Any]], pipelines: list[str]) -> dict[str, Any]:
    from memlong.evaluation import answer_key, miss_counts

    out: dict[str, Any] = {"questions": len(records)}
    for name in pipelines:
        rows = [r[name] for r in records if name in r]
        if not rows:
            continue
        ttft = [r["time_to_first_token"] for r in rows]
        hit = [r[name] for r in records if name in r and r.get("fact_retrieved")]
        out[name] = {"tokens_encoded_mean": statistics.fmean(r["tokens_encoded"] for r in rows),
                     "memory_tokens_mean": statistics.fmean(r["memory_tokens"] for r in rows),
                     "llm_calls_mean": statistics.fmean(r["llm_calls"] for r in rows),
                     "ttft_mean_s": statistics.fmean(ttft), "ttft_median_s": statistics.median(ttft),
                     "accuracy": statistics.fmean(r["correct"] for r in rows),
                     "accuracy_when_fact_retrieved": statistics.fmean(r["correct"] for r in hit) if hit else None}
        misses = miss_counts([{"correct": r[name]["correct"], "needle_seen": bool(r.get("fact_retrieved"))}
                              for r in records if name in r])
        out[name].update(retrieval_misses=misses["retrieval"], reading_misses=misses["reading"])
        if any("first_call_correct" in r for r in rows):  # what the refine calls of a multi-call answer changed
            out[name]["accuracy_of_first_call"] = statistics.fmean(r.get("first_call_correct", r["correct"])
                                                                    for r in rows)
    both = [r for r in records if "kv" in r and "text" in r]
    if both:
        same = lambda r, clause=True: answer_key(r["kv"]["answer"], clause=clause) == answer_key(r["text"]["answer"],
                                                                                                 clause=clause)
        out["agreement"] = statistics.fmean(same(r) for r in both)
        out["agreement_first_line"] = statistics.fmean(same(r, False) for r in both)
        hit = [r for r in both if r["fact_retrieved"]]
        out["agreement_when_fact_retrieved"] = statistics.fmean(same(r) for r in hit) if hit else None
        out["same_chunks"] = statistics.fmean(r["kv"]["chunk_ids"] == r["text"]["chunk_ids"] for r in both)
        out["fact_retrieved"] = statistics.fmean(r["fact_retrieved"] for r in both)
        out["ttft_ratio_text_over_kv"] = out["text"]["ttft_mean_s"] / max(out["kv"]["ttft_mean_s"], 1e-9)
        out["tokens_ratio_text_over_kv"] = out["text"]["tokens_encoded_mean"] / max(out["kv"]["tokens_encoded_mean"], 1e-9)
    return out


LABELS = {"kv": "K-V injection (MemLongQueryEngine)", "text": "stock text pipeline (RetrieverQueryEngine)",
          "kv_chat_template": "K-V, chat path, chat template", "kv_chat_plain": "K-V, chat path, plain transcript"}


def table(summary: dict[str, Any]) -> str:
    lines = ["| pipeline | tokens encoded / query | K-V tokens attended | LLM calls / query | time to first token "
             "(mean / median) | accuracy | accuracy when the fact was retrieved |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, label in LABELS.items():
        s = summary.get(name)
        if s:
            lines.append(f"| {label} | {s['tokens_encoded_mean']:.1f} | {s['memory_tokens_mean']:.0f} | "
                         f"{s['llm_calls_mean']:.1f} | {s['ttft_mean_s']:.3f} s / {s['ttft_median_s']:.3f} s | "
                         f"{s['accuracy']:.0%} | {_pct(s['accuracy_when_fact_retrieved'])} |")
    if "agreement" in summary:
        lines.append("")
        lines.append(f"Questions: {summary['questions']}; same answer (K-V vs text, first clause): "
                     f"{summary['agreement']:.0%} ({_pct(summary['agreement_when_fact_retrieved'])} where the fact was "
                     f"retrieved; same first line: {_pct(summary.get('agreement_first_line'))}); "
                     f"same retrieved chunks: {summary['same_chunks']:.0%}; fact among the retrieved chunks: "
                     f"{summary['fact_retrieved']:.0%}; text/K-V tokens encoded: "
                     f"{summary['tokens_ratio_text_over_kv']:.1f}x; "
                     f"text/K-V time to first token: {summary['ttft_ratio_text_over_kv']:.1f}x.")
    return "\n".join(lines)


def failure_lines(summary: dict[str, Any]) -> list[str]:
    """One line per pipeline: how many answers failed, and why (retrieval vs reading misses)."""
    from memlong.evaluation import describe_misses

    lines = []
    for name, label in LABELS.items():
        s = summary.get(name)
        if s and "retrieval_misses" in s:
            wrong = s["retrieval_misses"] + s["reading_misses"]
            lines.append(f"{label}: {wrong}/{summary['questions']} wrong: " + describe_misses(
                {"retrieval": s["retrieval_misses"], "reading": s["reading_misses"]}))
        if s and s.get("llm_calls_mean", 1) > 1 and "accuracy_of_first_call" in s:
            lines.append(f"{label}: accuracy of the first LLM call {s['accuracy_of_first_call']:.0%}, of the final "
                         f"answer after the refine calls {s['accuracy']:.0%}")
    return lines


def fact_rank_of(nodes: list[Any], answer: str) -> int | None:
    """1-based rank, by retrieval score, of the first retrieved node whose text holds ``answer``."""
    from memlong.evaluation import fact_rank

    ranked = sorted(nodes, key=lambda n: -(n.score if n.score is not None else float("-inf")))  # stable on ties
    return fact_rank([n.node.get_content() for n in ranked], answer)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"



def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        names = [n for n in LABELS if any(n in r for r in saved["records"])]
        saved["summary"] = summarise(saved["records"], names)
        if args.json:  # refresh the stored summary (e.g. after adding a statistic)
            Path(args.json).write_text(json.dumps(saved, indent=1))
        print(table(saved["summary"]))
        print("\n".join(["", *failure_lines(saved["summary"])]))
        return 0
    from llama_index.core import Document, PromptTemplate, StorageContext, VectorStoreIndex
    from llama_index.core.base.llms.types import ChatMessage
    from llama_index.core.query_engine import RetrieverQueryEngine

    from memlong import MemLong, MemoryEvictionWarning
    from memlong.evaluation import planted_fact_documents
    from memlong_integrations.llama_index import (
        MemLongEmbedding,
        MemLongQueryEngine,
        MemLongVectorStore,
    )

    plays = tuple(p.strip() for p in args.plays.split(",") if p.strip())
    docs, facts = planted_fact_documents(args.facts, plays=plays, chars=args.chars, seed=args.seed,
                                         distinct=not args.dense)
    warnings.simplefilter("error", MemoryEvictionWarning)  # an evicted fact would make the comparison meaningless
    ml = MemLong.from_pretrained(args.model, top_k=args.top_k, memory_capacity=args.memory_capacity,
                                 chunk_size=args.chunk_size, kv_refresh=args.kv_refresh,
                                 kv_reencode_head=args.kv_reencode_head)
    namespace = "rag-llama-index"
    ml.reset(namespace)
    store = MemLongVectorStore(ml, namespace=namespace, show_progress=not args.no_progress,
                               chunk_context=args.chunk_context)
    t0 = time.perf_counter()
    documents = [Document(text=d, metadata={"play": p}, excluded_llm_metadata_keys=["play"]) for d, p in zip(docs, plays)]
    build = VectorStoreIndex.from_documents if args.split else VectorStoreIndex  # documents as nodes: streamed whole
    index = build(documents, storage_context=StorageContext.from_defaults(vector_store=store),
                  embed_model=MemLongEmbedding.from_memlong(ml))
    ingest_s = time.perf_counter() - t0
    config = {**{k: v for k, v in vars(args).items() if k != "json"}, "plays": list(plays),
              "documents_tokens": [len(ml.tokenize(d)) for d in docs], "chunks": len(ml.bank.chunk_ids(namespace)),
              "ingest_seconds": ingest_s, "memlong": repr(ml), "torch_threads": __import__("torch").get_num_threads(),
              "note": "CPU shared with other jobs; compare the two pipelines within this run (interleaved per question)."}
    print(f"ingested {sum(config['documents_tokens'])} tokens into {config['chunks']} chunks in {ingest_s:.0f} s",
          file=sys.stderr)

    debug: list[dict[str, Any]] = []
    LLM = logging_llm(debug)
    common = {"namespace": namespace, "max_new_tokens": args.max_new_tokens, "stop": ["\n"]}
    kv_llm = LLM(ml, **common)
    text_llm = LLM(ml, retrieve=False, **common)
    chat_llms = {"kv_chat_template": LLM(ml, chat_template=True, **common),
                 "kv_chat_plain": LLM(ml, chat_template=False, **common)}
    query_mode = {"dense": "default", "lexical": "text_search", "hybrid": "hybrid"}[args.search_mode]
    retriever = index.as_retriever(similarity_top_k=args.top_k, vector_store_query_mode=query_mode)
    kv_llm.complete("\nQuestion: warm-up\nAnswer:", memlong_chunk_ids=[])  # one-time costs (sink K-V) out of the timing
    llm_calls(debug)

    pipelines = ["kv", "text"] + ([] if args.no_chat else list(chat_llms))
    records: list[dict[str, Any]] = []
    from tqdm.auto import tqdm

    for i, fact in enumerate(tqdm(facts, desc="questions", disable=args.no_progress)):
        tail = "\nQuestion: {query_str}\nAnswer: " + fact.answer_prefix
        kv_engine = MemLongQueryEngine.from_args(retriever, llm=kv_llm, prompt_template=PromptTemplate(tail))
        text_engine = RetrieverQueryEngine.from_args(retriever, llm=text_llm, response_mode=args.text_mode,
                                                     text_qa_template=PromptTemplate("{context_str}" + tail))
        record: dict[str, Any] = {"question": fact.question, "answer": fact.answer, "document": plays[fact.document]}
        order = [("kv", kv_engine), ("text", text_engine)]
        for name, engine in order if i % 2 == 0 else order[::-1]:  # alternate who goes first
            start = time.perf_counter()
            response = engine.query(fact.question)
            seconds = time.perf_counter() - start
            calls = llm_calls(debug)
            ids = [n.node.node_id for n in response.source_nodes]
            record[name] = {"answer": str(response.response), "correct": fact.correct(str(response.response)),
                            "tokens_encoded": sum(c["prompt_tokens"] + c["refreshed_tokens"] for c in calls),
                            "memory_tokens": sum(c["memory_tokens"] for c in calls), "llm_calls": len(calls),
                            "time_to_first_token": calls[0]["time_to_first_token"], "query_seconds": seconds,
                            "chunk_ids": ids, "call_answers": [c["text"] for c in calls],
                            "first_call_correct": fact.correct(calls[0]["text"])}
            if name == "kv":
                record["fact_rank"] = fact_rank_of(list(response.source_nodes), fact.answer)
                record["fact_retrieved"] = record["fact_rank"] is not None
        for name, llm in ({} if args.no_chat else chat_llms).items():
            start = time.perf_counter()
            chat = llm.chat([ChatMessage(role="user", content=fact.question)],
                            memlong_chunk_ids=record["kv"]["chunk_ids"])
            calls = llm_calls(debug)
            answer = chat.message.content or ""
            record[name] = {"answer": answer, "correct": fact.correct(answer),
                            "tokens_encoded": sum(c["prompt_tokens"] + c["refreshed_tokens"] for c in calls),
                            "memory_tokens": sum(c["memory_tokens"] for c in calls), "llm_calls": len(calls),
                            "time_to_first_token": calls[0]["time_to_first_token"],
                            "query_seconds": time.perf_counter() - start, "chunk_ids": record["kv"]["chunk_ids"]}
        records.append(record)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"config": config, "summary": summarise(records, pipelines),
                                                   "records": records}, indent=1))
    summary = summarise(records, pipelines)
    print(table(summary))
    print("\n".join(["", *failure_lines(summary)]))
    ml.reset(namespace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
