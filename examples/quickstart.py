"""Quickstart: stream a long document into memory, then ask about it; only the question is encoded."""
from memlong import MemLong
from memlong.evaluation import planted_fact_documents

# a Hamlet excerpt with one planted fact ("The keeper of ... is ...") somewhere inside
(document,), (fact,) = planted_fact_documents(1, plays=("hamlet",), chars=3000, distinct=True)

ml = MemLong.from_pretrained("default", top_k=4)
stats = ml.ingest(document, namespace="hamlet", progress=False)  # streams any length into the memory bank
print(f"ingested {stats.tokens} tokens as {stats.chunks} chunks")

# a plain continuation prompt + the answer's first words: small models use memory best this way
answer = ml.generate(f"\nQuestion: {fact.question}\nAnswer:", query=fact.question, namespace="hamlet",
                     answer_prefix=f" {fact.answer_prefix}", max_new_tokens=12, stop=["\n"])
print(fact.question)
print("answer:", fact.answer_prefix + answer)
print(ml.last_generation)  # prompt tokens encoded, memory tokens attended, chunk ids, time to first token
