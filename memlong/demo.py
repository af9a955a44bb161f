"""The demo scenario behind ``memlong demo``: a long play with a planted fact, answered from memory.

A Shakespeare play (``shakespeare`` package) gets one sentence planted at half depth; the play is ingested into
namespace ``"demo"`` (or a memory saved by an earlier run is loaded), and the model answers a question about the
fact with only the question encoded and the retrieved chunks' K-V attended. :func:`run_demo` prints the answer
as it streams and returns a summary record (tokens, memory size, timings, whether the fact's chunk was found).

Example:
    >>> from memlong import MemLong
    >>> summary = run_demo(MemLong.from_pretrained("default", top_k=4), play="hamlet")
    >>> summary["answer_mentions_saffron"]
"""

from __future__ import annotations

from typing import Any

from memlong.evaluation import shakespeare_text
from memlong.model import IngestStats, MemLong
from memlong.prompts import question_prompt

__all__ = ["FACT", "QUESTION", "plant_fact", "run_demo"]

FACT = "\nThe secret ingredient of the royal cake is purple saffron from the island of Zanthe.\n"
QUESTION = "What is the secret ingredient of the royal cake?"
ANSWER_PREFIX = " The secret ingredient of the royal cake is"


def plant_fact(text: str, depth: float = 0.5) -> str:
    """``text`` with :data:`FACT` inserted at the line break before ``depth`` of its length."""
    cut = text.rfind("\n", 0, int(len(text) * depth))
    return text[:cut] + FACT + text[cut:]


def run_demo(ml: MemLong, *, play: str = "hamlet", load_memory: str | None = None, save_memory: str | None = None,
             max_new_tokens: int = 24, progress: bool = True, load_s: float = 0.0) -> dict[str, Any]:
    """Run the scenario on ``ml``, printing as it goes; returns the summary record."""
    document = plant_fact(shakespeare_text(play))
    print(f"memlong demo: {play} ({len(document):,} characters) with a planted fact at 50 % depth")
    print(f"model: {ml}")
    if load_memory:  # reuse a memory saved by an earlier `memlong demo --save-memory DIR`
        ml.load_memory(load_memory, namespaces=["demo"])
        stats = IngestStats()
        print(f"loaded memory from {load_memory}: {ml.bank!r}")
    else:
        stats = ml.ingest(document, namespace="demo", progress=progress)
    if save_memory:
        print(f"saved memory to {ml.save_memory(save_memory, namespaces=['demo'])}")
    print(f"\nQ: {QUESTION}\nA: ", end="", flush=True)
    answer = ""
    print(ANSWER_PREFIX.strip(), end="", flush=True)
    # A plain continuation prompt: retrieved chunks sit before it, so the play text flows straight into the
    # question (a chat header between them confuses a 135M model); the answer's form is forced.
    generation = ml.generate(question_prompt(QUESTION), query=QUESTION, namespace="demo",
                             answer_prefix=ANSWER_PREFIX, max_new_tokens=max_new_tokens, stream=True)
    for piece in generation:
        answer += piece
        print(piece, end="", flush=True)
    gen = generation.stats
    print("\n")
    hits = [ml.bank.get(c, namespace="demo").text for c in gen.chunk_ids]
    return {
        "tokens_ingested": stats.tokens, "chunks": len(ml.bank.chunk_ids("demo")),
        "memory_tokens": ml.bank.num_tokens("demo"), "memory_mb": round(ml.bank.nbytes("demo") / 2**20, 1),
        "load_s": round(load_s, 2), "ingest_s": round(stats.seconds, 2),
        "ingest_tokens_per_s": round(stats.tokens_per_second, 1),
        "prompt_tokens_encoded": gen.prompt_tokens, "memory_tokens_attended": gen.memory_tokens,
        "fact_chunk_retrieved": any("purple saffron" in h for h in hits),
        "answer_mentions_saffron": "saffron" in answer.lower(),
        "time_to_first_token_s": round(gen.time_to_first_token, 3), "generate_s": round(gen.seconds, 2),
    }
