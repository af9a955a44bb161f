"""MemLong in LlamaIndex: retrieved chunks reach the model as stored K-V instead of re-encoded text.

* :class:`MemLongLLM` — ``CustomLLM`` over a :class:`memlong.MemLong` (ids via ``memlong_chunk_ids``).
* :class:`MemLongVectorStore` — ``BasePydanticVectorStore`` over a bank namespace (``VectorStoreIndex`` ingests
  into the bank, K-V computed at insert); :class:`MemLongEmbedding` — the bank's embedder as an embed model.
* :class:`MemLongRetriever` — ``BaseRetriever`` returning chunks with their ids in hidden metadata.
* :class:`MemLongSynthesizer` / :class:`MemLongQueryEngine` — pass chunk ids to the LLM instead of text.
* :class:`MemLongMemoryBlock` — a ``Memory`` block keeping old chat turns in the bank as K-V.

Importing this package has no side effects. The first adapter you build makes LlamaIndex's tiktoken token
counting work offline (the ``cl100k_base`` file ships in llama-index-core), unless you set a global tokenizer
yourself; call :func:`ensure_offline_tiktoken` to do it explicitly.

Example:
    >>> from llama_index.core import Document, StorageContext, VectorStoreIndex
    >>> from memlong import MemLong
    >>> from memlong_integrations.llama_index import MemLongEmbedding, MemLongLLM, MemLongSynthesizer, MemLongVectorStore
    >>> ml = MemLong.from_pretrained("default", top_k=4)
    >>> store = MemLongVectorStore(ml, namespace="plays")
    >>> index = VectorStoreIndex([Document(text=play)], embed_model=MemLongEmbedding.from_memlong(ml),  # whole
    ...                          storage_context=StorageContext.from_defaults(vector_store=store))
    >>> llm = MemLongLLM(ml, namespace="plays", max_new_tokens=32, stop=["\\n"])
    >>> engine = index.as_query_engine(llm=llm, similarity_top_k=4, response_synthesizer=MemLongSynthesizer(llm))
    >>> print(engine.query("Who is the keeper of the iron key?"))
"""

from memlong_integrations.llama_index._common import ensure_offline_tiktoken
from memlong_integrations.llama_index.embedding import MemLongEmbedding
from memlong_integrations.llama_index.llm import CHUNK_IDS_KWARG, TEXT_IN_MEMORY_KWARG, MemLongLLM
from memlong_integrations.llama_index.memory import MemLongMemoryBlock
from memlong_integrations.llama_index.query_engine import DEFAULT_KV_PROMPT, MemLongQueryEngine, MemLongSynthesizer
from memlong_integrations.llama_index.retriever import MemLongRetriever
from memlong_integrations.llama_index.vector_store import MemLongVectorStore
from memlong_integrations.metadata import CHUNK_ID_KEY, NAMESPACE_KEY

__all__ = ["CHUNK_IDS_KWARG", "CHUNK_ID_KEY", "DEFAULT_KV_PROMPT", "NAMESPACE_KEY", "TEXT_IN_MEMORY_KWARG",
           "MemLongEmbedding", "MemLongLLM", "MemLongMemoryBlock", "MemLongQueryEngine", "MemLongRetriever",
           "MemLongSynthesizer", "MemLongVectorStore", "ensure_offline_tiktoken"]
