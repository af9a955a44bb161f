"""RAG with LlamaIndex: a VectorStoreIndex whose vector store is the memory bank. The K-V engine reads the
retrieved chunks as stored K-V; the stock engine pastes their text. Both answer."""
from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.query_engine import RetrieverQueryEngine

from memlong import MemLong
from memlong.evaluation import planted_fact_documents
from memlong_integrations.llama_index import MemLongEmbedding, MemLongLLM, MemLongQueryEngine, MemLongVectorStore

(play,), (fact,) = planted_fact_documents(1, plays=("macbeth",), chars=3000, distinct=True)  # one planted fact

ml = MemLong.from_pretrained("default", top_k=1, search_mode="hybrid")  # ranks chunks by BM25 + embeddings
store = MemLongVectorStore(ml, namespace="plays", show_progress=False)
index = VectorStoreIndex([Document(text=play)],  # documents as nodes: each streamed whole into the bank
                         storage_context=StorageContext.from_defaults(vector_store=store),
                         embed_model=MemLongEmbedding.from_memlong(ml))
llm = MemLongLLM(ml, namespace="plays", max_new_tokens=32, stop=["\n"])
retriever = index.as_retriever(similarity_top_k=1)  # one chunk: a 135M model reads one best

print(fact.question)
kv = MemLongQueryEngine.from_args(retriever, llm=llm)  # K-V: only the question is encoded
print("K-V answer:  ", kv.query(fact.question), "| prompt tokens:", ml.last_generation.prompt_tokens)
text = RetrieverQueryEngine.from_args(retriever, llm=llm)  # stock: retrieved text pasted and re-encoded
print("text answer: ", text.query(fact.question), "| prompt tokens:", ml.last_generation.prompt_tokens)
