"""LangChain adapters for MemLong: retrieved chunks reach the model as stored K-V instead of re-encoded text.

* :class:`ChatMemLong` (``BaseChatModel``, ``chat_models.py``) and :class:`MemLongLLM` (``LLM``, ``llms.py``) over a
  :class:`memlong.MemLong`; chunk ids through the call keyword ``memlong_chunk_ids``. With none they read only
  their input (``retrieve=True``: they retrieve from their namespace).
* :class:`MemLongRetriever` (``BaseRetriever``): chunk Documents with ``metadata["memlong_chunk_id"]``.
* :class:`MemLongVectorStore` (``VectorStore``): entries ingested as chunk K-V; ``filter=`` and MMR searches.
* :func:`create_memlong_rag_chain`, :func:`chunk_ids_runnable`, :func:`memlong_chunk_ids_from_documents`: LCEL glue.
* :class:`MemLongChatMessageHistory`: conversation turns stored in the bank as K-V.
"""

from memlong_integrations.metadata import CHUNK_ID_KEY

from .chains import chunk_ids_runnable, create_memlong_rag_chain, memlong_chunk_ids_from_documents
from .chat_history import MemLongChatMessageHistory
from .chat_models import ChatMemLong
from .llms import MemLongLLM
from .retrievers import MemLongRetriever
from .vectorstores import MemLongVectorStore

__all__ = ["CHUNK_ID_KEY", "ChatMemLong", "MemLongChatMessageHistory", "MemLongLLM", "MemLongRetriever",
           "MemLongVectorStore", "chunk_ids_runnable", "create_memlong_rag_chain", "memlong_chunk_ids_from_documents"]
