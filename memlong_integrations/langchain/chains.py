"""LCEL glue: retrieved ``Document`` s reach :class:`ChatMemLong` as chunk ids (K-V), not as pasted text.

Recipe (what :func:`create_memlong_rag_chain` builds; any LCEL pattern works the same way)::

    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnableLambda, RunnableParallel, RunnablePassthrough

    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    to_ids = chunk_ids_runnable(retriever)                    # Documents -> chunk ids of the same bank
    chain = (
        RunnableParallel(question=RunnablePassthrough(), chunk_ids=retriever | to_ids)
        | RunnableLambda(lambda x: prompt | chat.bind(memlong_chunk_ids=x["chunk_ids"]))  # ids -> K-V
        | StrOutputParser()
    )
    chain.invoke("What is the password of the harbour gate?")

A ``RunnableLambda`` that returns a runnable invokes it with its own input, so the per-question ids are bound
per call and streaming passes through. The prompt carries only the question: the retrieved text is never
encoded again.

Example:
    >>> chain = create_memlong_rag_chain(store.as_retriever(search_kwargs={"k": 4}), chat)
    >>> out = chain.invoke("Who keeps the iron key?")
    >>> out["answer"], [d.id for d in out["context"]]
"""

from __future__ import annotations

from typing import Any, Literal

from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough
from langchain_core.vectorstores import VectorStoreRetriever

from memlong import MemoryBank

from ._common import memlong_chunk_ids_from_documents
from .chat_models import ChatMemLong
from .retrievers import MemLongRetriever
from .vectorstores import MemLongVectorStore

__all__ = ["chunk_ids_runnable", "create_memlong_rag_chain", "memlong_chunk_ids_from_documents"]


def _bank_and_namespace(source: Any) -> tuple[MemoryBank, str]:
    if isinstance(source, MemLongVectorStore):
        return source.bank, source.namespace
    if isinstance(source, VectorStoreRetriever) and isinstance(source.vectorstore, MemLongVectorStore):
        return source.vectorstore.bank, source.vectorstore.namespace
    if isinstance(source, MemLongRetriever):
        return source.bank, source.namespace
    raise TypeError(f"Cannot tell which memory bank {type(source).__name__} reads: pass a MemLongRetriever, a "
                    "MemLongVectorStore or its as_retriever().")


def chunk_ids_runnable(source: BaseRetriever | MemLongVectorStore, *, missing: Literal["raise", "skip"] = "raise"
                       ) -> Runnable[list[Document], list[str]]:
    """A runnable mapping retrieved Documents to chunk ids of the bank ``source`` reads (``missing``: as
    :func:`memlong_chunk_ids_from_documents`).

    Raises (when run) a ``ValueError`` if the namespace is empty: nothing was added to the store yet.
    """
    bank, namespace = _bank_and_namespace(source)

    def to_ids(documents: list[Document]) -> list[str]:
        if not documents and not bank.num_chunks(namespace):
            raise ValueError(f"The MemLong store (namespace {namespace!r}) is empty: add documents "
                             "(MemLongVectorStore.add_documents or MemLong.ingest) before asking questions.")
        return memlong_chunk_ids_from_documents(documents, bank=bank, namespace=namespace, missing=missing)

    return RunnableLambda(to_ids, name="memlong_chunk_ids")


def create_memlong_rag_chain(retriever: BaseRetriever, chat: ChatMemLong, prompt: ChatPromptTemplate | None = None,
                             *, paste: bool = False) -> Runnable[str | dict[str, Any], dict[str, Any]]:
    """Retriever -> ChatMemLong chain. Input: a question, or a dict with ``"question"`` (plus any other prompt
    variables, e.g. ``"answer_prefix"`` for a prompt ending in an AI prefill). Output: ``{"question", "context"
    (the retrieved Documents), "answer" (str), ...}``; ``chain.stream`` streams the answer.

    Args:
        retriever: a :class:`MemLongRetriever` or ``MemLongVectorStore.as_retriever()``.
        chat: the chat model over the same MemLong and namespace as ``retriever`` (``ValueError`` otherwise);
            retrieved chunks reach it as ``memlong_chunk_ids``.
        prompt: default ``[("human", "{question}")]``; with ``paste=True`` it must use ``{context}``
            (default ``[("system", "{context}"), ("human", "{question}")]``).
        paste: the usual RAG baseline instead: paste the retrieved text into the prompt (``{context}``, chunk
            texts in document order) and attend to no memory. Same retriever and documents, for comparisons.
    """
    bank, namespace = _bank_and_namespace(retriever)
    if not isinstance(chat, ChatMemLong):
        raise TypeError(f"create_memlong_rag_chain needs a ChatMemLong (it passes chunk ids, not text), got "
                        f"{type(chat).__name__}.")
    if chat.memlong.bank is not bank:
        raise ValueError("The chat model and the retriever use different MemLong models (memory banks); the chunk "
                         "ids the retriever finds exist only in its own bank. Build both over the same MemLong.")
    if chat.namespace != namespace:
        raise ValueError(f"The chat model reads namespace {chat.namespace!r} but the retriever searches "
                         f"{namespace!r}. Give both the same namespace: ChatMemLong(memlong=ml, namespace={namespace!r}).")
    to_ids = chunk_ids_runnable(retriever, missing="skip")  # a chunk deleted since retrieval: answer from the others
    if prompt is None:
        prompt = ChatPromptTemplate.from_messages([("system", "{context}"), ("human", "{question}")] if paste
                                                  else [("human", "{question}")])
    elif paste and "context" not in prompt.input_variables:
        raise ValueError("paste=True needs a prompt with a {context} variable for the retrieved text.")

    def as_dict(question: str | dict[str, Any]) -> dict[str, Any]:
        data = {"question": question} if isinstance(question, str) else dict(question)
        if not isinstance(data.get("question"), str) or not data["question"].strip():
            raise ValueError("The chain needs a non-empty question (a string, or a dict with 'question').")
        return data

    def answer(data: dict[str, Any]) -> Runnable:
        # another thread may delete a retrieved chunk before the answer reads it (a re-index while serving): the
        # answer reads the others, as a search a moment later would have found them
        ids = to_ids.invoke(data["context"])
        if paste:
            text = "".join(bank.get(c, namespace=namespace).text for c in ids)
            return RunnablePassthrough.assign(context=lambda _: text) | prompt | chat.bind(
                memlong_chunk_ids=[], memlong_namespace=namespace) | StrOutputParser()
        return prompt | chat.bind(memlong_chunk_ids=ids, memlong_namespace=namespace) | StrOutputParser()

    retrieve = RunnableLambda(lambda data: data["question"]) | retriever
    return (RunnableLambda(as_dict, name="question")
            | RunnablePassthrough.assign(context=retrieve)
            | RunnablePassthrough.assign(answer=RunnableLambda(answer, name="memlong_answer"))).with_config(
        run_name="memlong_rag_chain")
