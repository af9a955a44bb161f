"""LangChain adapters: chat model, LLM, retriever, vector store, chains and chat history (tiny random model), and one
end-to-end RAG chain on the real default model."""

import asyncio

import pytest
import torch
from helpers import stop_across_pieces
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnableParallel, RunnablePassthrough

from memlong import UnknownChunkError
from memlong_integrations._answer import KV_ANSWER_PREFIX, answer_pieces, answer_text
from memlong_integrations.langchain import (
    CHUNK_ID_KEY,
    ChatMemLong,
    MemLongChatMessageHistory,
    MemLongLLM,
    MemLongRetriever,
    MemLongVectorStore,
    chunk_ids_runnable,
    create_memlong_rag_chain,
)
from memlong_integrations.langchain.chat_models import PLAIN_STOP

TEXT = ("The harbour gate opens at dawn and closes at dusk. Falcons nest in the northern tower every spring. "
        "The abbey bell rings at noon. Saffron is stored in the silver chest beneath the west chapel. "
        "The copper lamp lights the chapel at night, and the keeper of the iron key is Tobias Wren.")
QUESTION = "Where is the saffron stored?"


KV = " " + KV_ANSWER_PREFIX  # prefilled in the plain layout when chunks are attended and no prefill is given


def plain(question: str) -> str:
    return f"\nQuestion: {question}\nAnswer:"


@pytest.fixture()
def tiny(make_tiny):
    ml, _ = make_tiny(top_k=2, chunk_size=16, local_window=64)  # several small chunks per text
    ml.ingest(TEXT, namespace="kb", progress=False)
    return ml


class Tokens(BaseCallbackHandler):
    def __init__(self):
        self.tokens = []

    def on_llm_new_token(self, token, **kwargs):
        self.tokens.append(token)


# ------------------------------------------------------------------ chat model
def test_chat_passes_chunk_ids_as_kv_and_reports_usage(tiny):
    ids = tiny.bank.chunk_ids("kb")[1:3]
    chat = ChatMemLong(memlong=tiny, namespace="kb", max_tokens=6)
    msg = chat.invoke(QUESTION, memlong_chunk_ids=ids)
    gen = tiny.last_generation
    assert gen.chunk_ids == ids
    assert gen.memory_tokens == sum(tiny.bank.get(c, namespace="kb").n_tokens for c in ids)
    assert gen.prompt_tokens == len(tiny.encode_prompt(plain(QUESTION), answer_prefix=KV))  # only the question was encoded
    # the adapter is the core call, nothing more: same text as MemLong.generate with the same chunks
    core = tiny.generate(plain(QUESTION), namespace="kb", chunk_ids=ids, max_new_tokens=6, stream=True,
                         answer_prefix=KV)
    assert msg.content == answer_text(core, PLAIN_STOP, strip=True)
    usage = msg.usage_metadata
    assert usage["input_tokens"] == gen.prompt_tokens + gen.memory_tokens
    assert usage["input_token_details"]["cache_read"] == gen.memory_tokens
    assert usage["output_tokens"] == gen.new_tokens <= 6
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert msg.response_metadata["memlong"]["chunk_ids"] == ids
    # .bind carries the same keyword
    chat.bind(memlong_chunk_ids=ids[:1]).invoke(QUESTION)
    assert tiny.last_generation.chunk_ids == ids[:1]


def test_chat_retrieves_as_the_core_does_with_retrieve_next(tiny):
    """Review finding: ChatMemLong searched the bank itself and ignored config.retrieve_next."""
    import dataclasses

    from memlong.generation import retrieve_ids

    tiny.config = dataclasses.replace(tiny.config, retrieve_next=1)
    ChatMemLong(memlong=tiny, namespace="kb", max_tokens=2, retrieve=True).invoke(QUESTION)
    expected = retrieve_ids(tiny, QUESTION, "kb")
    assert tiny.last_generation.chunk_ids == expected and len(expected) > tiny.config.top_k


def test_chat_reads_memory_only_when_asked(tiny):
    """Issue 18, finding 3: with no ids the chat model reads only its messages (a stock LCEL chain pasting text
    must not also attend the bank); ``retrieve=True`` retrieves."""
    ChatMemLong(memlong=tiny, namespace="kb", max_tokens=4).invoke(QUESTION)
    assert tiny.last_generation.chunk_ids == [] and tiny.last_generation.memory_tokens == 0
    paste = ChatPromptTemplate.from_messages([("system", "{context}"), ("human", "{question}")])
    (paste | ChatMemLong(memlong=tiny, namespace="kb", max_tokens=4) | StrOutputParser()).invoke(
        {"context": "Saffron is in the chest.", "question": QUESTION})
    assert tiny.last_generation.memory_tokens == 0
    MemLongLLM(memlong=tiny, namespace="kb", max_tokens=3).invoke(plain(QUESTION))
    assert tiny.last_generation.memory_tokens == 0
    MemLongLLM(memlong=tiny, namespace="kb", max_tokens=3, retrieve=True).invoke(plain(QUESTION))
    assert len(tiny.last_generation.chunk_ids) == 2


def test_chat_retrieves_from_its_namespace_without_ids(tiny):
    chat = ChatMemLong(memlong=tiny, namespace="kb", max_tokens=4, retrieve=True)
    chat.invoke(QUESTION)
    expected = [h.chunk_id for h in tiny.bank.search(QUESTION, namespace="kb", k=2, count=False)]
    assert tiny.last_generation.chunk_ids == expected
    assert tiny.last_generation.prompt_tokens == len(tiny.encode_prompt(plain(QUESTION), answer_prefix=KV))  # plain + memory
    # an empty namespace: nothing to attend, the chat template is used
    ChatMemLong(memlong=tiny, namespace="nothing-here", max_tokens=4, retrieve=True).invoke(QUESTION)
    assert tiny.last_generation.memory_tokens == 0
    assert tiny.last_generation.prompt_tokens == len(tiny.encode_prompt(QUESTION, chat=True))
    ChatMemLong(memlong=tiny, namespace="kb", max_tokens=4, retrieve=False).invoke(QUESTION)
    assert tiny.last_generation.chunk_ids == []
    chat.invoke(QUESTION, memlong_namespace="nothing-here")  # per-call namespace
    assert tiny.last_generation.chunk_ids == []


def test_chat_prefill_and_conversation_rendering(tiny):
    ids = tiny.bank.chunk_ids("kb")[:2]
    chat = ChatMemLong(memlong=tiny, namespace="kb", max_tokens=4)
    chat.invoke([HumanMessage(QUESTION), AIMessage("It is stored in")], memlong_chunk_ids=ids)
    assert tiny.last_generation.prompt_tokens == len(tiny.encode_prompt(plain(QUESTION), answer_prefix=" It is stored in"))
    chat.invoke([("system", "Be brief."), ("human", "hi"), ("ai", "hello"), ("human", QUESTION)], memlong_chunk_ids=ids)
    prompt = "\nBe brief.\nQuestion: hi\nAnswer: hello\nQuestion: " + QUESTION + "\nAnswer:"
    assert tiny.last_generation.prompt_tokens == len(tiny.encode_prompt(prompt, answer_prefix=KV))


def test_chat_streams_tokens_through_callbacks(tiny):
    ids = tiny.bank.chunk_ids("kb")[:2]
    chat = ChatMemLong(memlong=tiny, namespace="kb", max_tokens=8)
    full = chat.invoke(QUESTION, memlong_chunk_ids=ids).content
    handler = Tokens()
    chunks = list(chat.stream(QUESTION, memlong_chunk_ids=ids, config={"callbacks": [handler]}))
    assert "".join(c.content for c in chunks) == "".join(handler.tokens) == full
    assert chunks[-1].chunk_position == "last"
    assert chunks[-1].usage_metadata["output_tokens"] == tiny.last_generation.new_tokens
    assert sum(1 for c in chunks if c.usage_metadata) == 1
    handler = Tokens()
    streaming = ChatMemLong(memlong=tiny, namespace="kb", max_tokens=8, streaming=True)
    assert streaming.invoke(QUESTION, memlong_chunk_ids=ids, config={"callbacks": [handler]}).content == full
    assert "".join(handler.tokens) == full and len([t for t in handler.tokens if t]) > 1


async def test_chat_async_matches_sync(tiny):
    ids = tiny.bank.chunk_ids("kb")[:2]
    chat = ChatMemLong(memlong=tiny, namespace="kb", max_tokens=6)
    full = chat.invoke(QUESTION, memlong_chunk_ids=ids).content
    assert (await chat.ainvoke(QUESTION, memlong_chunk_ids=ids)).content == full
    assert "".join([c.content async for c in chat.astream(QUESTION, memlong_chunk_ids=ids)]) == full


def test_chat_stop_sequences_and_max_tokens(tiny):
    chat = ChatMemLong(memlong=tiny, namespace="kb", max_tokens=12, prompt_format="chat", retrieve=False)
    text = chat.invoke(QUESTION).content
    assert len(text) >= 6, text
    stop = text[3:6]
    cut = text[:text.find(stop)]
    assert chat.invoke(QUESTION, stop=[stop]).content == cut
    assert ChatMemLong(memlong=tiny, namespace="kb", max_tokens=12, prompt_format="chat", retrieve=False,
                       stop=[stop]).invoke(QUESTION).content == cut
    short = ChatMemLong(memlong=tiny, namespace="kb", max_tokens=2, prompt_format="chat", retrieve=False).invoke(QUESTION)
    assert short.usage_metadata["output_tokens"] <= 2 and short.response_metadata["finish_reason"] == "length"


def test_finish_reason_is_stop_when_a_stop_string_ends_on_the_last_token(tiny):
    """Review finding: a stop string completed by the last allowed token was reported as "length"."""
    chat = ChatMemLong(memlong=tiny, namespace="kb", prompt_format="chat", retrieve=False)
    for n in range(2, 12):
        before, after = (chat.invoke(QUESTION, max_tokens=m).content for m in (n - 1, n))
        last = after[len(before):].strip()
        if after.startswith(before) and len(last) >= 2 and last not in before:
            break
    else:
        pytest.fail("no token of the tiny model's answer adds a new visible string")
    msg = chat.invoke(QUESTION, max_tokens=n, stop=[last])
    assert msg.usage_metadata["output_tokens"] == n and msg.content == before.rstrip()
    assert msg.response_metadata["finish_reason"] == "stop"
    assert chat.invoke(QUESTION, max_tokens=n).response_metadata["finish_reason"] == "length"


def test_options_by_either_name_per_call_too_and_typos_refused(tiny):
    """Review findings: ``max_new_tokens=2`` (the LlamaIndex name) was ignored and the answer ran to 256 tokens;
    ``.bind(max_tokens=3)`` raised; typos (``temprature``) passed silently; MemLongLLM had no ``stop`` field. Now:
    both names everywhere, per call too; LangChain's remote-only options accepted; anything else refused."""
    from pydantic import ValidationError

    for cls in (ChatMemLong, MemLongLLM):
        assert cls(memlong=tiny, max_new_tokens=2).max_tokens == 2 == cls(memlong=tiny, max_tokens=2).max_tokens
        assert cls(memlong=tiny, timeout=60, max_retries=2, api_key="x").max_tokens == 256
        with pytest.raises(ValidationError, match="temprature"):
            cls(memlong=tiny, temprature=0.5)
    with pytest.raises(ValidationError, match="kk"):
        MemLongRetriever(bank=tiny.bank, kk=3)
    chat = ChatMemLong(memlong=tiny, namespace="kb", max_tokens=12, prompt_format="chat", retrieve=False)
    for msg in (chat.invoke(QUESTION, max_tokens=2), chat.bind(max_tokens=2).invoke(QUESTION),
                chat.invoke(QUESTION, max_new_tokens=2)):
        assert msg.usage_metadata["output_tokens"] == 2 and msg.response_metadata["finish_reason"] == "length"
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        chat.invoke(QUESTION, max_tokens=0)
    assert chat.bind(max_tokens=None).invoke(QUESTION).usage_metadata["output_tokens"] > 2  # None: the default
    llm = MemLongLLM(memlong=tiny, namespace="kb", max_tokens=12)
    text = llm.invoke(plain(QUESTION))
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert MemLongLLM(memlong=tiny, max_tokens=12, stop=[stop]).invoke(plain(QUESTION)) == text[:text.find(stop)]
    assert len(tiny.tokenize(llm.invoke(plain(QUESTION), max_tokens=1))) <= 2  # one new token (plus a BOS)
    with pytest.raises(TypeError, match="takes k only.*search_kwargs=\\{'filter'"):
        MemLongRetriever(bank=tiny.bank, namespace="kb").invoke(QUESTION, filter={"a": 1})


def test_concurrent_calls_keep_their_own_chunks(tiny):
    ids = tiny.bank.chunk_ids("kb")
    chat = ChatMemLong(memlong=tiny, namespace="kb", max_tokens=4)
    out = RunnableParallel(a=chat.bind(memlong_chunk_ids=ids[:1]), b=chat.bind(memlong_chunk_ids=ids[2:4])).invoke(QUESTION)
    assert out["a"].response_metadata["memlong"]["chunk_ids"] == ids[:1]
    assert out["b"].response_metadata["memlong"]["chunk_ids"] == ids[2:4]


def test_chat_bad_input_gets_clear_errors(tiny):
    chat = ChatMemLong(memlong=tiny, namespace="kb", max_tokens=4)
    with pytest.raises(UnknownChunkError, match="not in namespace 'kb'"):
        chat.invoke(QUESTION, memlong_chunk_ids=["no-such-chunk"])
    with pytest.raises(ValueError, match="longer than the local window"):
        chat.invoke("word " * 200, memlong_chunk_ids=[])
    with pytest.raises(TypeError, match="unknown call keywords"):
        chat.invoke(QUESTION, memlong_chunk_id=["x"])
    with pytest.raises(TypeError, match="list of chunk id strings"):
        chat.invoke(QUESTION, memlong_chunk_ids="abc")
    with pytest.raises(ValueError, match="cannot switch"):
        chat.invoke(QUESTION, model="gpt-4o")
    with pytest.raises(ValueError, match="text only"):
        chat.invoke([HumanMessage([{"type": "image", "url": "https://example.org/a.png"}])])
    with pytest.raises(ValueError, match="tool"):
        chat.invoke([HumanMessage("hi"), ToolMessage("3", tool_call_id="1")])
    with pytest.raises(NotImplementedError):
        chat.bind_tools([])
    with pytest.raises(ValueError, match="max_tokens"):
        ChatMemLong(memlong=tiny, max_tokens=0)


def test_llm_is_the_plain_core_call(tiny):
    ids = tiny.bank.chunk_ids("kb")[:2]
    llm = MemLongLLM(memlong=tiny, namespace="kb", max_tokens=5)
    assert llm.invoke(plain(QUESTION), memlong_chunk_ids=ids) == tiny.generate(plain(QUESTION), namespace="kb",
                                                                              chunk_ids=ids, max_new_tokens=5).rstrip()
    assert tiny.last_generation.chunk_ids == ids


# ------------------------------------------------------------------ retriever
def test_retriever_documents_carry_chunk_ids(tiny):
    retriever = MemLongRetriever.from_memlong(tiny, namespace="kb")
    docs = retriever.invoke(QUESTION)
    hits = tiny.bank.search(QUESTION, namespace="kb", k=2, count=False)
    assert [d.metadata[CHUNK_ID_KEY] for d in docs] == [h.chunk_id for h in hits]
    assert [d.page_content for d in docs] == [tiny.bank.get(h.chunk_id, namespace="kb").text for h in hits]
    assert len(retriever.invoke(QUESTION, k=1)) == 1
    assert MemLongRetriever(bank=tiny.bank, namespace="empty").invoke(QUESTION) == []
    with pytest.raises(ValueError, match="query is empty"):
        retriever.invoke("  ")


async def test_retriever_async_takes_what_sync_takes(tiny):
    """Async review: ainvoke(q, k=1) raised a bare TypeError (LangChain's default async twin takes no keywords)."""
    retriever = MemLongRetriever(bank=tiny.bank, namespace="kb", count_retrievals=False)
    assert [d.page_content for d in await retriever.ainvoke(QUESTION, k=1)] == \
        [d.page_content for d in retriever.invoke(QUESTION, k=1)]
    assert len(await retriever.bind(k=1).ainvoke(QUESTION)) == 1
    assert len(await retriever.ainvoke(QUESTION)) == 4
    with pytest.raises(TypeError, match="takes k only"):
        await retriever.ainvoke(QUESTION, filter={"a": 1})


def test_retriever_search_modes(tiny):
    for mode in ("dense", "lexical", "hybrid"):
        docs = MemLongRetriever(bank=tiny.bank, namespace="kb", k=2, search_mode=mode).invoke(QUESTION)
        hits = tiny.bank.search(QUESTION, namespace="kb", k=2, mode=mode, count=False)
        assert [d.metadata[CHUNK_ID_KEY] for d in docs] == [h.chunk_id for h in hits]
    docs = MemLongRetriever(bank=tiny.bank, namespace="kb", k=3, search_mode="lexical").invoke("saffron")
    assert len(docs) >= 1 and all("saffron" in d.page_content.lower() for d in docs)  # only word matches


# ------------------------------------------------------------------ vector store
def test_vector_store_entries_round_trip_and_span_chunks(tiny):
    store = MemLongVectorStore(tiny, namespace="vs")
    ids = store.add_documents([Document(TEXT, metadata={"src": "long"}), Document("Bells ring at noon.", id="bell")],
                              ids=["long", None])
    assert ids[0] == "long" and ids[1] != "long"  # an explicit kwarg id wins; the missing one is generated
    owned = [c for c in tiny.bank.chunk_ids("vs") if tiny.bank.get(c, namespace="vs").doc_id == "long"]
    assert len(owned) > 1  # a long entry spans several K-V chunks
    hits = store.similarity_search_with_score(QUESTION, k=2)
    assert [d.id for d, _ in hits].count("long") == 1
    # the search counted one retrieval for each returned entry's best chunk, none for the other candidates
    counts = {c: tiny.bank.get(c, namespace="vs").retrievals for c in tiny.bank.chunk_ids("vs")}
    assert sum(counts.values()) == 2 and sum(counts[c] for c in owned) == 1
    long_doc = next(d for d, _ in hits if d.id == "long")
    assert long_doc == Document(TEXT, metadata={"src": "long"}, id="long")
    assert store.chunk_ids([long_doc]) == owned  # every chunk of the entry, in document order
    assert all(0.0 <= s <= 1.0 for _, s in store.similarity_search_with_relevance_scores(QUESTION, k=2))
    assert store.get_by_ids(["long", "missing"]) == [long_doc]
    assert store.delete(["missing"]) is True and store.delete([ids[1]]) is True
    assert [d.id for d in store.similarity_search(QUESTION, k=5)] == ["long"]


def test_vector_store_under_langchains_indexing_api(tiny):
    """Review finding: ``langchain_core.indexing.index`` / ``aindex`` crashed on their first call (``add_documents``
    passes ``batch_size``, which add_texts refused), and once an entry was gone (evicted, or deleted by hand) every
    later cleanup failed: ``delete`` returned False for the missing id, which LangChain reads as a failed delete."""
    import asyncio

    from langchain_core.indexing import InMemoryRecordManager, aindex, index

    store = MemLongVectorStore(tiny, namespace="indexed")
    manager = InMemoryRecordManager("memlong/indexed")
    manager.create_schema()
    docs = [Document("The harbour gate password is marigold.", metadata={"source": "gate"}),
            Document("Falcons nest in the northern tower.", metadata={"source": "tower"}),
            Document("The abbey bell rings at noon.", metadata={"source": "bell"})]

    def sync(documents, cleanup="incremental"):
        return index(documents, manager, store, cleanup=cleanup, source_id_key="source", key_encoder="sha256")

    assert sync(docs) == {"num_added": 3, "num_updated": 0, "num_skipped": 0, "num_deleted": 0}
    assert sync(docs)["num_skipped"] == 3
    docs[0] = Document("The harbour gate password is thistle.", metadata={"source": "gate"})
    assert sync(docs) == {"num_added": 1, "num_updated": 0, "num_skipped": 2, "num_deleted": 1}
    texts = sorted(d.page_content for d in store.similarity_search("harbour gate password", k=5))
    assert texts == sorted(d.page_content for d in docs)  # the old version is gone
    tower = next(d.id for d in store.similarity_search("falcons tower", k=5) if d.metadata["source"] == "tower")
    store.delete([tower])  # gone without the record manager knowing (as an eviction would)
    assert store.delete([tower]) is True  # a missing id is no failure
    assert sync(docs[:1] + docs[2:], cleanup="full")["num_deleted"] == 1  # was: IndexingException
    assert sorted(d.metadata["source"] for d in store.similarity_search("gate bell", k=5)) == ["bell", "gate"]
    result = asyncio.run(aindex(docs[:1] + [Document("Saffron is in the chest.", metadata={"source": "chest"})],
                                manager, store, cleanup="full", source_id_key="source", key_encoder="sha256"))
    assert result == {"num_added": 1, "num_updated": 0, "num_skipped": 1, "num_deleted": 1}
    assert sorted(d.metadata["source"] for d in store.similarity_search("gate chest", k=5)) == ["chest", "gate"]


def test_vector_store_failed_upsert_loses_nothing(tiny):
    store = MemLongVectorStore(tiny, namespace="vs2")
    store.add_texts(["Falcons nest in the tower."], ids=["a"])
    before = store.get_by_ids(["a"])
    with pytest.raises(ValueError, match="empty"):
        store.add_texts(["   "], ids=["a"])
    with pytest.raises(ValueError, match="2 ids"):
        store.add_texts(["x"], ids=["a", "b"])
    assert store.get_by_ids(["a"]) == before
    store.add_texts(["Falcons moved to the abbey."], ids=["a"])
    assert [d.page_content for d in store.get_by_ids(["a"])] == ["Falcons moved to the abbey."]
    assert len({tiny.bank.get(c, namespace="vs2").doc_id for c in tiny.bank.chunk_ids("vs2")}) == 1
    with pytest.raises(ValueError, match="embedding=None"):
        MemLongVectorStore.from_texts(["x"], embedding=object(), memlong=tiny)
    built = MemLongVectorStore.from_texts(["y z"], memlong=tiny, namespace="vs3")
    assert built.similarity_search("y", k=1)[0].page_content == "y z"
    docs = [Document(page_content="u v w", metadata={"n": 1}, id="first"), Document(page_content="p q")]
    built = MemLongVectorStore.from_documents(docs, memlong=tiny, namespace="vs4")  # no embedding argument needed
    got = {d.page_content: d for d in built.similarity_search("u", k=2)}
    assert got["u v w"].id == "first" and got["u v w"].metadata == {"n": 1} and got["p q"].id
    import asyncio

    built = asyncio.run(MemLongVectorStore.afrom_documents(docs, memlong=tiny, namespace="vs5"))
    assert {d.id for d in built.similarity_search("u", k=2)} >= {"first"}


# ------------------------------------------------------------------ chains
def test_lcel_recipe_sends_retrieved_documents_as_kv(tiny):
    store = MemLongVectorStore(tiny, namespace="vs")
    store.add_texts([TEXT, "Bells ring at noon."])
    retriever = store.as_retriever(search_kwargs={"k": 1})
    chat = ChatMemLong(memlong=tiny, namespace="vs", max_tokens=4)
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    chain = (RunnableParallel(question=RunnablePassthrough(), chunk_ids=retriever | chunk_ids_runnable(retriever))
             | RunnableLambda(lambda x: prompt | chat.bind(memlong_chunk_ids=x["chunk_ids"]))
             | StrOutputParser())
    answer = chain.invoke(QUESTION)
    gen = tiny.last_generation
    assert gen.chunk_ids == store.chunk_ids(retriever.invoke(QUESTION)) and gen.chunk_ids
    assert gen.prompt_tokens == len(tiny.encode_prompt(plain(QUESTION), answer_prefix=KV))
    assert answer == "".join(chain.stream(QUESTION))


@pytest.mark.parametrize("paste", [False, True])
def test_rag_chain_answers_when_a_retrieved_chunk_is_deleted_meanwhile(tiny, paste):
    """Async review: a chunk deleted (by another request) between the chain's retrieval and its answer raised
    UnknownChunkError; the answer now reads the retrieved chunks still stored."""
    class DeleteFirst(BaseCallbackHandler):
        def on_retriever_end(self, documents, **kwargs):
            tiny.bank.delete([documents[0].metadata[CHUNK_ID_KEY]], namespace="kb")

    retriever = MemLongRetriever(bank=tiny.bank, namespace="kb", k=2)
    chat = ChatMemLong(memlong=tiny, namespace="kb", max_tokens=4, prompt_format="plain")
    out = create_memlong_rag_chain(retriever, chat, paste=paste).invoke(QUESTION, config={"callbacks": [DeleteFirst()]})
    ids = [d.metadata[CHUNK_ID_KEY] for d in out["context"]]
    assert len(ids) == 2 and tiny.bank.stored(ids, namespace="kb") == ids[1:]
    assert tiny.last_generation.chunk_ids == ([] if paste else ids[1:])


def test_rag_chain_helper_kv_and_paste(tiny):
    retriever = MemLongRetriever(bank=tiny.bank, namespace="kb", k=2)
    chat = ChatMemLong(memlong=tiny, namespace="kb", max_tokens=4, prompt_format="plain")
    out = create_memlong_rag_chain(retriever, chat).invoke(QUESTION)
    assert set(out) >= {"question", "context", "answer"}
    ids = [d.metadata[CHUNK_ID_KEY] for d in out["context"]]
    kv = tiny.last_generation
    assert sorted(kv.chunk_ids) == sorted(ids) and kv.prompt_tokens == len(tiny.encode_prompt(plain(QUESTION),
                                                                                         answer_prefix=KV))
    create_memlong_rag_chain(retriever, chat, paste=True).invoke({"question": QUESTION})
    pasted = tiny.last_generation
    text = "".join(tiny.bank.get(c, namespace="kb").text for c in kv.chunk_ids)
    assert pasted.memory_tokens == 0 and pasted.prompt_tokens == len(tiny.encode_prompt(text + plain(QUESTION)))
    pieces = [c["answer"] for c in create_memlong_rag_chain(retriever, chat).stream(QUESTION) if "answer" in c]
    assert "".join(pieces) == out["answer"]


def test_chain_bad_input_gets_clear_errors(tiny):
    chat = ChatMemLong(memlong=tiny, namespace="kb", max_tokens=4)
    empty = MemLongVectorStore(tiny, namespace="empty-store")
    with pytest.raises(ValueError, match="is empty: add documents"):
        create_memlong_rag_chain(empty.as_retriever(), chat.model_copy(update={"namespace": "empty-store"})
                                 ).invoke(QUESTION)
    with pytest.raises(ValueError, match="non-empty question"):
        create_memlong_rag_chain(MemLongRetriever(bank=tiny.bank, namespace="kb"), chat).invoke({"q": QUESTION})
    store = MemLongVectorStore(tiny, namespace="kb")
    with pytest.raises(UnknownChunkError, match="never added"):
        store.chunk_ids([Document("x", id="not-an-entry")])
    with pytest.raises(ValueError, match="neither"):
        store.chunk_ids([Document("x")])
    with pytest.raises(TypeError, match="which memory bank"):
        chunk_ids_runnable(object())


# ------------------------------------------------------------------ chat history
def test_chat_history_stores_turns_as_kv(tiny):
    history = MemLongChatMessageHistory(tiny, session_id="alice")
    turns = [HumanMessage("My locker code is 4417."), AIMessage("Noted: locker code 4417."), HumanMessage("Thanks!")]
    history.add_messages(turns)
    assert history.messages == turns
    ids = history.chunk_ids()
    assert ids and tiny.bank.fetch(ids, namespace=history.namespace)[0].shape[2] == tiny.bank.num_tokens(history.namespace)
    chat = ChatMemLong(memlong=tiny, namespace=history.namespace, max_tokens=4, retrieve=True)
    chat.invoke("What is my locker code?")
    gen = tiny.last_generation
    assert gen.chunk_ids and set(gen.chunk_ids) <= set(ids)
    assert gen.prompt_tokens == len(tiny.encode_prompt(plain("What is my locker code?"), answer_prefix=KV))  # not re-encoded
    with pytest.raises(ValueError, match="empty"):
        history.add_messages([HumanMessage("")])
    before = len(history.messages)
    history.add_messages([AIMessage("")])  # an empty answer: not stored (nothing to read back), no error
    assert len(history.messages) == before
    history.clear()
    assert history.messages == [] and history.namespace not in tiny.bank.namespaces()


# ------------------------------------------------------------------ end to end on the default model
FACT = "The secret ingredient of the royal cake is purple saffron from the island of Zanthe."


def _passages(text: str, size: int = 600) -> list[str]:
    """A plain splitter: paragraphs packed into passages of about ``size`` characters."""
    out, cur = [], ""
    for para in text.split("\n\n"):
        if cur and len(cur) + len(para) > size:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    return out + [cur] if cur.strip() else out


@pytest.mark.slow
def test_end_to_end_documents_store_retriever_chain_answer(default_memlong):
    from memlong.evaluation import shakespeare_text

    ml = default_memlong
    play = shakespeare_text("macbeth")[3_000:9_000]
    cut = play.find("\n\n", len(play) // 2)
    docs = [Document(p, metadata={"play": "macbeth", "part": i})
            for i, p in enumerate(_passages(play[:cut] + "\n\n" + FACT + play[cut:]))]
    ml.reset("lc-e2e")
    store = MemLongVectorStore(ml, namespace="lc-e2e")
    ids = store.add_documents(docs)
    assert ml.bank.num_tokens("lc-e2e") > ml.config.local_window  # more than the window: the fact comes from memory
    retriever = store.as_retriever(search_kwargs={"k": 2})
    chat = ChatMemLong(memlong=ml, namespace="lc-e2e", max_tokens=12)
    prompt = ChatPromptTemplate.from_messages([("human", "{question}"), ("ai", "{answer_prefix}")])
    question = "What is the secret ingredient of the royal cake?"
    prefix = "The secret ingredient of the royal cake is"
    out = create_memlong_rag_chain(retriever, chat, prompt).invoke({"question": question, "answer_prefix": prefix})
    gen = ml.last_generation
    fact_entry = next(i for i, d in zip(ids, docs) if FACT in d.page_content)
    assert fact_entry in [d.id for d in out["context"]]  # the retriever found the passage with the fact
    assert gen.chunk_ids == store.chunk_ids(out["context"])  # ... and its chunks reached the model as K-V
    assert gen.memory_tokens == sum(ml.bank.get(c, namespace="lc-e2e").n_tokens for c in gen.chunk_ids)
    assert gen.prompt_tokens == len(ml.encode_prompt(plain(question), answer_prefix=" " + prefix))  # question only
    assert "saffron" in out["answer"].lower(), out["answer"]
    ml.reset("lc-e2e")


def test_vector_store_chunk_context(tiny):
    """The store computes each chunk's K-V from the chunk alone by default (as pasting it would)."""
    ref_alone = tiny.ingest(TEXT, namespace="ref-alone", context="chunk", progress=False).chunk_ids
    ref_doc = tiny.ingest(TEXT, namespace="ref-doc", progress=False).chunk_ids
    for context, ref, ref_ns in ((None, ref_alone, "ref-alone"), ("document", ref_doc, "ref-doc")):
        kwargs = {} if context is None else {"chunk_context": context}
        store = MemLongVectorStore(tiny, namespace=f"ctx-{context}", **kwargs)
        store.add_texts([TEXT], ids=["t"])
        got = tiny.bank.chunk_ids(store.namespace)
        assert len(got) == len(ref) > 3
        for a, b in zip(got, ref):
            assert torch.equal(tiny.bank.get(a, namespace=store.namespace).keys, tiny.bank.get(b, namespace=ref_ns).keys)
    with pytest.raises(ValueError, match="chunk_context must be 'chunk' or 'document'"):
        MemLongVectorStore(tiny, namespace="bad", chunk_context="page")


# ------------------------------------------------------------------ issue 18
def _pieces(chat, **kwargs):
    return [c.content for c in chat.stream(QUESTION, **kwargs) if c.content]


def test_stop_strings_never_leak_even_in_part(tiny):
    """Finding 2: a stop string forming over two pieces is not returned in part: ``invoke(stop=)``,
    ``bind(stop=)``, the ``stop`` field, streaming, and the completion LLM."""
    chat = ChatMemLong(memlong=tiny, namespace="kb", max_tokens=12, prompt_format="chat")
    pieces = _pieces(chat)
    stop, want = stop_across_pieces(pieces)  # forms over two pieces: its first half must be held back
    assert chat.invoke(QUESTION, stop=[stop]).content == want
    assert chat.bind(stop=[stop]).invoke(QUESTION).content == want
    assert ChatMemLong(memlong=tiny, namespace="kb", max_tokens=12, prompt_format="chat",
                       stop=[stop]).invoke(QUESTION).content == want
    assert "".join(_pieces(chat, stop=[stop])) == want
    llm = MemLongLLM(memlong=tiny, namespace="kb", max_tokens=12)
    text = llm.invoke(plain(QUESTION))
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert llm.invoke(plain(QUESTION), stop=[stop]) == text[:text.find(stop)]
    assert llm.invoke(plain(QUESTION), stop=stop) == text[:text.find(stop)]  # one string: one stop string
    assert "".join(llm.stream(plain(QUESTION), stop=[stop])) == text[:text.find(stop)]


def test_answer_pieces_hold_back_stops_and_whitespace():
    """Finding 2 and the small-model habits, on the text level: no trailing newline from the built-in stops,
    an empty answer is "", a newline before the first word does not end the answer."""
    assert answer_text(iter([" Halvora", " Qu", "ince", " and"]), ["Quince"]) == " Halvora "
    assert list(answer_pieces(iter([" Halvora", " Qu", "ince"]), ["Quince"], strip=True)) == ["Halvora"]
    assert answer_text(iter(["\n", "Tobias", " Wren.", "\n", "\n", "Question"]), PLAIN_STOP, strip=True) == "Tobias Wren."
    assert answer_text(iter(["Tobias Wren.", "\n", "Question:", " who"]), PLAIN_STOP, strip=True) == "Tobias Wren."
    assert answer_text(iter(["\n", "\n"]), PLAIN_STOP, strip=True) == ""
    assert answer_text(iter(["\n", "Question: who?"]), PLAIN_STOP, strip=True) == ""
    assert answer_text(iter(["\n", "Tobias Wren.", "\n", "More"]), ["\n"]) == "\nTobias Wren."
    assert answer_text(iter(["Qu"]), ["Quince"]) == "Qu"  # ended without the stop: nothing held back
    # labels small models put before an answer are not part of it; words that only look like one are kept
    assert answer_text(iter(["A", ":\n", "Tobias Wren.", "\nB"]), ["\n"], strip=True) == "Tobias Wren."
    assert answer_text(iter(["user", ": The answer is:", " Tobias Wren."]), PLAIN_STOP, strip=True) == "Tobias Wren."
    assert answer_text(iter(["A", " cat"]), [], strip=True) == "A cat"
    assert answer_text(iter(["The answer is", " 42"]), [], strip=True) == "The answer is 42"
    # an answer that ends while its start could still become a label: its label dropped, its stops applied (the
    # default model streamed " the answer is:\n\nThe answer" whole, label and "\n\n" included)
    assert answer_text(iter([" the", " answer", " is", ":", "\n", "\n", "The", " answer"]), PLAIN_STOP,
                       strip=True) == "The answer"
    assert answer_text(iter(["The", " answer\n\nQuestion: who?"]), PLAIN_STOP, strip=True) == "The answer"
    assert answer_text(iter(["Answer", ":"]), PLAIN_STOP, strip=True) == ""
    closed = []

    def endless():
        try:
            while True:
                yield "ab"
        finally:
            closed.append(True)

    assert answer_text(endless(), ["ba"]) == "a" and closed == [True]  # a stop ends decoding at once


def test_vector_store_filters_like_langchains_in_memory_store(tiny):
    """Finding 6: ``filter=`` (a dict over metadata, or a callable over the Document, as InMemoryVectorStore)
    is applied by every search, never silently ignored."""
    store = MemLongVectorStore(tiny, namespace="filtered")
    docs = [Document(f"{text} The harbour gate.", metadata={"source": src, "n": i}, id=f"d{i}")
            for i, (src, text) in enumerate([("a", "Falcons nest in the tower."), ("b", "Saffron in the chest."),
                                             ("a", "The bell rings at noon."), ("b", "The lamp lights the chapel.")])]
    store.add_documents(docs)
    for flt in ({"source": "b"}, lambda d: d.metadata["source"] == "b"):
        found = store.similarity_search("harbour gate", k=4, filter=flt)
        assert {d.id for d in found} == {"d1", "d3"}
        assert all(d.metadata["source"] == "b" for d, _ in store.similarity_search_with_score("gate", k=4, filter=flt))
        assert {d.id for d in store.max_marginal_relevance_search("gate", k=2, filter=flt)} == {"d1", "d3"}
        assert {d.id for d in store.as_retriever(search_kwargs={"k": 4, "filter": flt}).invoke("gate")} == {"d1", "d3"}
    assert store.similarity_search("gate", k=4, filter={"source": "b", "n": 3})[0].id == "d3"
    assert store.similarity_search("gate", k=4, filter={"missing": None}) == []
    with pytest.raises(TypeError, match="filter must be"):
        store.similarity_search("gate", filter=["source"])
    # Chroma / PGVector-style operators matched nothing, silently (a wrong answer): refused, naming the way
    for flt in ({"n": {"$gt": 1}}, {"source": {"$in": ["b"]}}, {"$and": [{"source": "b"}]}, {"$or": []}):
        with pytest.raises(ValueError, match=r"operator '\$.*pass a callable"):
            store.similarity_search("gate", k=4, filter=flt)
        with pytest.raises(ValueError, match="operator"):
            store.as_retriever(search_kwargs={"filter": flt}).invoke("gate")
    threshold = store.as_retriever(search_type="similarity_score_threshold",  # LangChain's own keywords still pass
                                   search_kwargs={"score_threshold": -1.0, "k": 4, "filter": {"source": "b"}})
    assert {d.id for d in threshold.invoke("gate")} == {"d1", "d3"}
    # a misspelt keyword was ignored, silently (InMemoryVectorStore does too; MemLongRetriever refused it already)
    for search in (lambda: store.similarity_search("gate", filters={"source": "b"}),
                   lambda: store.as_retriever(search_kwargs={"filters": {"source": "b"}}).invoke("gate"),
                   lambda: store.max_marginal_relevance_search("gate", k=2, fetchk=8)):
        with pytest.raises(TypeError, match="unknown keyword"):
            search()
    n = len(store.get_by_ids(["d0", "d1", "d2", "d3"]))
    for write in (lambda: store.add_texts(["x"], metadata=[{"a": 1}]), lambda: store.delete(id=["d0"]),
                  lambda: store.add_documents([Document("y")], namespce="other")):
        with pytest.raises(TypeError, match="unknown keyword"):  # delete(id=...) deleted every entry
            write()
    assert len(store.get_by_ids(["d0", "d1", "d2", "d3"])) == n
    store.add_documents([Document("A nested gate.", metadata={"where": {"city": "x"}}, id="nested")])
    assert [d.id for d in store.similarity_search("gate", k=4, filter={"where": {"city": "x"}})] == ["nested"]
    store.add_documents([Document("A gate by reference.", metadata={"ref": {"$ref": "a"}}, id="ref")])
    assert [d.id for d in store.similarity_search("gate", filter={"ref": {"$ref": "a"}})] == ["ref"]  # not an operator


def test_vector_store_mmr_matches_in_memory_store(tiny):
    """Finding 6: MMR (sync, by vector, async, ``as_retriever(search_type="mmr")``) chooses what LangChain's
    InMemoryVectorStore chooses over the same texts and embedder."""
    import asyncio

    from langchain_core.embeddings import Embeddings
    from langchain_core.vectorstores import InMemoryVectorStore

    class BankEmbeddings(Embeddings):
        def embed_documents(self, texts):
            return tiny.bank.embedder.encode(list(texts)).tolist()

        def embed_query(self, text):
            return self.embed_documents([text])[0]

    texts = ["Falcons nest in the tower.", "Falcons nest in the tall tower.", "Saffron is kept in the chest.",
             "The abbey bell rings at noon.", "Falcons and hawks nest in towers."]
    ids = [f"t{i}" for i in range(len(texts))]
    ours = MemLongVectorStore(tiny, namespace="mmr")
    ours.add_texts(texts, ids=ids)
    theirs = InMemoryVectorStore(BankEmbeddings())
    theirs.add_texts(texts, ids=ids)
    query = "Where do falcons nest?"
    for lam in (0.0, 0.5, 1.0):
        want = [d.id for d in theirs.max_marginal_relevance_search(query, k=3, fetch_k=5, lambda_mult=lam)]
        assert [d.id for d in ours.max_marginal_relevance_search(query, k=3, fetch_k=5, lambda_mult=lam)] == want
    vector = BankEmbeddings().embed_query(query)
    want = [d.id for d in theirs.max_marginal_relevance_search_by_vector(vector, k=3, fetch_k=5)]
    assert [d.id for d in ours.max_marginal_relevance_search_by_vector(vector, k=3, fetch_k=5)] == want
    assert [d.id for d in asyncio.run(ours.amax_marginal_relevance_search(query, k=3, fetch_k=5))] == want
    retriever = ours.as_retriever(search_type="mmr", search_kwargs={"k": 3, "fetch_k": 5})
    assert [d.id for d in retriever.invoke(query)] == want


def test_mmr_counts_the_retrieval_of_each_chosen_entrys_best_chunk(tiny):
    """Comments-vs-code audit (session 24): the store promises that a search bumps each returned entry's best
    chunk (eviction reads the counters), but MMR bumped the entry's first chunk whatever matched."""
    store = MemLongVectorStore(tiny, namespace="vs")
    store.add_texts([TEXT], ids=["long"])
    owned = tiny.bank.chunk_ids("vs")
    best = tiny.bank.search(QUESTION, namespace="vs", k=1, count=False, mode="dense")[0].chunk_id
    assert len(owned) > 2 and best != owned[0]  # the saffron sentence lies past the first chunk
    assert [d.id for d in store.max_marginal_relevance_search(QUESTION, k=1, fetch_k=4)] == ["long"]
    assert {c: tiny.bank.get(c, namespace="vs").retrievals for c in owned if tiny.bank.get(c, namespace="vs")
            .retrievals} == {best: 1}


def test_unsupported_features_say_what_to_use_instead(tiny):
    """Finding 6: ``NotImplementedError`` with a message naming the alternative, not a bare one."""
    from pydantic import BaseModel

    class Answer(BaseModel):
        text: str

    chat = ChatMemLong(memlong=tiny, namespace="kb")
    with pytest.raises(NotImplementedError, match="tool calling.*Use a tool-calling chat model"):
        chat.bind_tools([Answer])
    with pytest.raises(NotImplementedError, match="structured output.*PydanticOutputParser"):
        chat.with_structured_output(Answer)


def test_rag_chain_refuses_a_chat_model_of_another_namespace(tiny):
    """Finding 8: a chat model reading another namespace than its retriever is refused, not overridden."""
    retriever = MemLongRetriever(bank=tiny.bank, namespace="kb")
    with pytest.raises(ValueError, match="reads namespace 'default' but the retriever searches 'kb'"):
        create_memlong_rag_chain(retriever, ChatMemLong(memlong=tiny, max_tokens=4))
    create_memlong_rag_chain(retriever, ChatMemLong(memlong=tiny, namespace="kb", max_tokens=4))  # same: fine


def test_message_history_is_read_once(tiny):
    """Finding 8: with ``RunnableWithMessageHistory`` and a ``MessagesPlaceholder`` the past turns are read as
    text only (not also retrieved as K-V); the K-V-only form reads them as K-V only."""
    from langchain_core.prompts import MessagesPlaceholder
    from langchain_core.runnables.history import RunnableWithMessageHistory

    history = MemLongChatMessageHistory(tiny, session_id="bob")
    history.add_messages([HumanMessage("My locker code is 4417."), AIMessage("Noted.")])
    prompt = ChatPromptTemplate.from_messages([MessagesPlaceholder("history"), ("human", "{question}")])
    chat = ChatMemLong(memlong=tiny, namespace=history.namespace, max_tokens=3, prompt_format="plain")
    text_form = RunnableWithMessageHistory(  # deprecated in langchain-core 1.x, still shipped and used
        prompt | chat, lambda session_id: history, input_messages_key="question",
                                           history_messages_key="history")
    text_form.invoke({"question": "What is my locker code?"}, config={"configurable": {"session_id": "bob"}})
    assert tiny.last_generation.memory_tokens == 0  # history pasted as text, once
    # K-V only: the prompt holds only the question; the model retrieves the past turns from the bank
    kv_form = RunnableWithMessageHistory(
        ChatPromptTemplate.from_messages([("human", "{question}")]) | chat.model_copy(update={"retrieve": True}),
        lambda session_id: history, input_messages_key="question", history_messages_key="history")  # unused
    kv_form.invoke({"question": "What is my locker code?"}, config={"configurable": {"session_id": "bob"}})
    gen = tiny.last_generation
    assert gen.memory_tokens > 0 and gen.prompt_tokens == len(tiny.encode_prompt(plain("What is my locker code?"),
                                                                                    answer_prefix=KV))


def test_langchain_package_has_no_import_cycle_and_old_paths_work():
    """Issue 17: the modules import one way (no chains <-> vectorstores circle, also not inside functions);
    ``MemLongLLM`` lives in ``llms.py`` and still imports from the package."""
    import ast
    from pathlib import Path

    import memlong_integrations.langchain as package
    from memlong_integrations.langchain.llms import MemLongLLM as FromModule

    root = Path(package.__file__).parent
    graph = {}
    for path in root.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                name = node.module or ""
                if node.level == 1:
                    deps.add(name)
                elif name.startswith("memlong_integrations.langchain."):
                    deps.add(name.rsplit(".", 1)[1])
        graph[path.stem] = deps - {"__init__"}

    def reaches(start, target, seen=()):
        return any(d == target or (d not in seen and reaches(d, target, (*seen, d))) for d in graph.get(start, ()))

    assert not [m for m in graph if m != "__init__" and reaches(m, m)], graph
    assert package.MemLongLLM is FromModule


def test_interleaved_streams_report_their_own_usage(tiny):
    """Each call's usage comes from its own Generation, not from the model's shared last_generation: two streams
    started one after the other and read interleaved keep their own chunk ids and token counts."""
    ids = tiny.bank.chunk_ids("kb")
    chat = ChatMemLong(memlong=tiny, namespace="kb", max_tokens=4)
    a = chat.stream(QUESTION, memlong_chunk_ids=ids[:1])
    b = chat.stream("Who keeps the iron key? Tell me more about the tower.", memlong_chunk_ids=ids[1:3])
    first_a = next(a)  # a's prompt is encoded now, then b's: b becomes the model's last_generation
    first_b = next(b)
    rest_a, rest_b = [first_a, *a], [first_b, *b]
    meta_a, meta_b = rest_a[-1].response_metadata["memlong"], rest_b[-1].response_metadata["memlong"]
    assert meta_a["chunk_ids"] == ids[:1] and meta_b["chunk_ids"] == ids[1:3]
    assert meta_a["prompt_tokens"] < meta_b["prompt_tokens"]
    assert meta_a["memory_tokens"] == tiny.bank.get(ids[0], namespace="kb").n_tokens


def test_token_counts_use_the_models_tokenizer_so_trim_messages_trims(tiny):
    """get_num_tokens fell back to GPT-2's tokenizer, which offline counts nothing: trim_messages never trimmed."""
    from langchain_core.messages import trim_messages

    chat, llm = ChatMemLong(memlong=tiny), MemLongLLM(memlong=tiny)
    text = "Hello there, how are you on this bright morning?"
    assert chat.get_num_tokens(text) == llm.get_num_tokens(text) == len(tiny.tokenize(text)) > 0
    history = [HumanMessage(text), AIMessage("Very well, thank you kindly."), HumanMessage("Where are the falcons?")]
    kept = trim_messages(history, max_tokens=chat.get_num_tokens_from_messages(history[-1:]) + 2,
                         token_counter=chat, strategy="last")
    assert kept == history[-1:]


def test_bad_call_input_is_refused_by_name(tiny):
    store = MemLongVectorStore(tiny, namespace="bad")
    with pytest.raises(ValueError, match="empty string"):
        store.add_texts(["Clocks strike at noon."], ids=[""])  # it was stored, then broke every chain it reached
    assert tiny.bank.namespaces() == [] or "bad" not in tiny.bank.namespaces()
    store.add_texts(["Clocks strike at noon.", "Kites fly over the abbey."], ids=["c", "k"],
                    metadatas=[{"t": (1, 2)}, {"t": [3]}])
    for k in (2.0, -1, "2", True):
        with pytest.raises(ValueError, match="k must be an integer"):
            store.similarity_search("clocks", k=k)
    assert [d.id for d in store.similarity_search("clocks", k=2, filter={"t": (1, 2)})] == ["c"]  # stored as [1, 2]
    with pytest.raises(ValueError, match="question .* is empty"):
        ChatMemLong(memlong=tiny).invoke("   ", memlong_chunk_ids=tiny.bank.chunk_ids("bad"))
    cid = tiny.bank.chunk_ids("bad")[0]
    for model in (MemLongLLM(memlong=tiny, namespace="bad"), ChatMemLong(memlong=tiny, namespace="bad")):
        with pytest.raises(TypeError, match="list of chunk id strings"):
            model.invoke("Question: when do clocks strike?", memlong_chunk_ids=cid)  # was split into characters


def test_a_tokenizer_without_a_chat_template_answers_in_plain_by_default(tiny):
    """Outside-in review: a model whose tokenizer has no chat template (a base model) failed every ChatMemLong call
    without retrieval ("use role_prompt() or plain_prompt()", which a ChatMemLong user cannot call); "auto" now
    falls back to the plain layout, and asking for "chat" names ChatMemLong(prompt_format='plain')."""
    tokenizer = tiny.tokenizer
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        reply = ChatMemLong(memlong=tiny, namespace="kb", max_tokens=3).invoke("Who keeps the key?")
        assert isinstance(reply.content, str) and reply.usage_metadata["output_tokens"] > 0
        with pytest.raises(ValueError, match=r"prompt_format='plain'"):
            ChatMemLong(memlong=tiny, namespace="kb", max_tokens=3, prompt_format="chat").invoke("Who keeps the key?")
    finally:
        tokenizer.chat_template = template


def test_message_history_sessions_read_their_own_turns_and_stream(tiny):
    """The per-session ``RunnableWithMessageHistory`` form of chat_history.py's docstring: each session's model
    reads its own namespace (the documented form with one fixed namespace let "bob" retrieve "alice"'s turns);
    streamed turns (``AIMessageChunk``) are stored as "Answer:" turns with role "ai" (they were stored as
    "Aimessagechunk: ..."), and the configured model streams token by token (it answered in one piece)."""
    from langchain_core.messages import AIMessageChunk, HumanMessageChunk
    from langchain_core.runnables import ConfigurableField
    from langchain_core.runnables.history import RunnableWithMessageHistory

    chat = ChatMemLong(memlong=tiny, retrieve=True, max_tokens=6, prompt_format="plain", kv_answer_prefix="")
    chain = RunnableWithMessageHistory(
        ChatPromptTemplate.from_messages([("human", "{question}")])
        | chat.configurable_fields(namespace=ConfigurableField(id="session_id")),
        lambda session_id: MemLongChatMessageHistory(tiny, session_id, prefix=""),
        input_messages_key="question", history_messages_key="history")
    alice, bob = ({"configurable": {"session_id": f"chat:{who}"}} for who in ("alice", "bob"))
    chain.invoke({"question": "My locker code is 4417."}, config=alice)
    pieces = [c.content for c in chain.stream({"question": "What is my locker code?"}, config=alice)]
    assert len([p for p in pieces if p]) == tiny.last_generation.new_tokens > 1
    assert set(tiny.last_generation.chunk_ids) <= set(tiny.bank.chunk_ids("chat:alice"))
    chain.invoke({"question": "What is my locker code?"}, config=bob)
    assert not set(tiny.last_generation.chunk_ids) & set(tiny.bank.chunk_ids("chat:alice"))
    turns = [c for c in tiny.bank.chunks("chat:alice") if c.metadata["role"] == "ai"]
    assert len({c.doc_id for c in turns}) == 2 and all(c.text.startswith("\nAnswer: ") for c in turns)

    history = MemLongChatMessageHistory(tiny, session_id="chunks")
    streamed = [HumanMessageChunk(content="My code is 12."), AIMessageChunk(content="Noted.")]
    history.add_messages(streamed)
    assert [c.text for c in tiny.bank.chunks(history.namespace)] == ["\nQuestion: My code is 12.", "\nAnswer: Noted."]
    assert [c.metadata["role"] for c in tiny.bank.chunks(history.namespace)] == ["human", "ai"]
    assert history.messages == streamed


def test_text_llm_samples_reproducibly_with_a_seed(tiny):
    """LCEL review: the LangChain MemLongLLM had no ``seed`` (ChatMemLong has one): sampled answers could not be
    reproduced."""
    draws = {seed: [MemLongLLM(memlong=tiny, max_tokens=8, temperature=1.5, seed=seed).invoke(plain(QUESTION))
                    for _ in range(2)] for seed in (1, 2)}
    assert draws[1][0] == draws[1][1] and draws[2][0] == draws[2][1] and draws[1][0] != draws[2][0]


def test_text_llm_reports_token_usage(tiny):
    """Noticed in a review: the LangChain MemLongLLM reported no token usage (ChatMemLong does)."""
    ids = tiny.bank.chunk_ids("kb")[:2]
    llm = MemLongLLM(memlong=tiny, namespace="kb", max_tokens=4)
    result = llm.generate([plain(QUESTION), "Once upon a time"], memlong_chunk_ids=ids)
    assert [g[0].generation_info["finish_reason"] for g in result.generations] == ["length", "length"]
    infos = [g[0].generation_info["memlong"] for g in result.generations]
    assert [i["chunk_ids"] for i in infos] == [ids, ids] and infos[0]["namespace"] == "kb"
    assert [i["new_tokens"] for i in infos] == [4, 4] and infos[0]["time_to_first_token"] > 0
    assert infos[0]["memory_tokens"] == sum(len(tiny.bank.get(c, namespace="kb").tokens) for c in ids)
    usage = result.llm_output["token_usage"]
    assert usage["completion_tokens"] == 8
    assert usage["prompt_tokens"] == sum(i["prompt_tokens"] + i["memory_tokens"] for i in infos)
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8
    assert result.generations[0][0].text == llm.invoke(plain(QUESTION), memlong_chunk_ids=ids)

    streamed = list(llm.stream(plain(QUESTION), memlong_chunk_ids=ids))  # the info rides on a last, empty chunk
    assert "".join(streamed) == result.generations[0][0].text and streamed[-1] == ""
    first = result.generations[0][0].text.split()[0]
    cut = llm.generate([plain(QUESTION)], memlong_chunk_ids=ids, stop=[first]).generations[0][0]
    assert cut.text.strip() == "" and cut.generation_info["finish_reason"] == "stop"
    again = asyncio.run(llm.agenerate([plain(QUESTION)], memlong_chunk_ids=ids))
    timings = ("time_to_first_token", "seconds")
    assert {k: v for k, v in again.generations[0][0].generation_info["memlong"].items() if k not in timings} == \
        {k: v for k, v in infos[0].items() if k not in timings}
    assert again.llm_output["token_usage"]["prompt_tokens"] == infos[0]["prompt_tokens"] + infos[0]["memory_tokens"]


@pytest.mark.slow
def test_text_llm_streams_an_empty_answer(default_memlong):
    """Determinism review: the default model answers this bare prompt with end-of-sequence at once; MemLongLLM's
    invoke returned "" but stream() / astream() raised LangChain's "No generation chunks were returned"."""
    llm, prompt = MemLongLLM(memlong=default_memlong, max_tokens=24), "Who keeps the iron key?"
    assert default_memlong.generate(prompt, max_new_tokens=24) == ""  # the case: an empty answer
    assert llm.invoke(prompt) == "" and list(llm.stream(prompt)) == [""]

    async def streamed():
        return [c async for c in llm.astream(prompt)]

    assert asyncio.run(streamed()) == [""]


def test_chat_history_on_a_disk_bank_survives_a_restart_and_keeps_a_question_with_an_empty_answer(make_tiny,
                                                                                                   tmp_path):
    """Chat-memory review: on a disk bank the history reached disk only if the app committed, which no chat doc said
    (a clean exit lost every turn); an empty AI answer raised, and RunnableWithMessageHistory's listener only logged
    it, so the user's message was lost with it."""
    from memlong import MemoryBank

    ml, _ = make_tiny(top_k=2, chunk_size=16, local_window=64, memory_path=str(tmp_path / "bank"))

    def reopened(namespace):  # as the next process would find it
        bank = MemoryBank.load(tmp_path / "bank", embedder=ml.bank.embedder)
        return [c.text for c in bank.chunks(namespace)] if namespace in bank.namespaces() else []

    alice, bob = MemLongChatMessageHistory(ml, "alice"), MemLongChatMessageHistory(ml, "bob")
    alice.add_messages([HumanMessage("My dog is called Pixel."), AIMessage("")])  # an empty answer: skipped
    bob.add_messages([HumanMessage("I live in Porto."), AIMessage("Porto is lovely.")])
    assert [m.content for m in alice.messages] == ["My dog is called Pixel."]
    assert "".join(reopened(alice.namespace)) == "\nQuestion: My dog is called Pixel."
    assert "Porto is lovely." in "".join(reopened(bob.namespace))
    with pytest.raises(ValueError, match="empty human message"):
        alice.add_messages([HumanMessage("  "), AIMessage("Hm.")])
    alice.clear()
    assert reopened(alice.namespace) == [] and reopened(bob.namespace)  # durably, and only alice's
    manual = MemLongChatMessageHistory(ml, "carol", commit=False)
    manual.add_messages([HumanMessage("Remember 42.")])
    assert reopened(manual.namespace) == []  # the caller commits
    ml.bank.commit()
    assert reopened(manual.namespace)


def test_consistency_review_mistakes_get_errors(tiny):
    """Consistency review: ``ChatMemLong(top_k=-1, retrieve=True)`` answered with no memory and no error; the history
    took anything as its model; ``bank.search("")`` returned hits where every adapter refused a blank query."""
    from pydantic import ValidationError

    from memlong.generation import retrieve_ids

    with pytest.raises(ValidationError, match="top_k"):
        ChatMemLong(memlong=tiny, top_k=-1, retrieve=True)
    with pytest.raises(ValueError, match="k must be an integer >= 0"):
        retrieve_ids(tiny, "harbour", "kb", k=-1)
    with pytest.raises(TypeError, match="needs a memlong.MemLong"):
        MemLongChatMessageHistory("not a model", "alice")
    for mode in ("dense", "hybrid"):
        with pytest.raises(ValueError, match="empty search query"):
            tiny.bank.search("  ", namespace="kb", mode=mode)


def test_a_calls_temperature_and_seed_as_in_llamaindex(tiny):
    """Consistency review: LangChain's ChatMemLong and MemLongLLM refused a call's ``temperature`` / ``seed`` (TypeError),
    which LlamaIndex's MemLongLLM and ChatOpenAI take; code moved between the frameworks broke."""
    built = MemLongLLM(memlong=tiny, max_tokens=8, temperature=1.5, seed=3).invoke(plain(QUESTION))
    assert MemLongLLM(memlong=tiny, max_tokens=8).invoke(plain(QUESTION), temperature=1.5, seed=3) == built
    chat = ChatMemLong(memlong=tiny, namespace="kb", max_tokens=8)
    sampled = ChatMemLong(memlong=tiny, namespace="kb", max_tokens=8, temperature=1.5, seed=3).invoke(QUESTION)
    assert chat.invoke(QUESTION, temperature=1.5, seed=3).content == sampled.content
    assert chat.bind(temperature=1.5, seed=3).invoke(QUESTION).content == sampled.content
    with pytest.raises(ValueError, match="temperature"):
        chat.invoke(QUESTION, temperature=-1.0)


def test_a_chat_turn_whose_commit_fails_is_not_stored(make_tiny, tmp_path):
    """Diff review: a history's commit refused (another writer committed to the directory) raised after the turn was
    stored in memory, so a retry stored it twice; ``commit=True`` on a bank in memory failed on every turn; an AI
    tool call (no text) was skipped while its tool result was kept."""
    from langchain_core.messages import ToolMessage

    from memlong import MemoryBank

    ml, _ = make_tiny(top_k=2, chunk_size=16, local_window=64, memory_path=str(tmp_path / "bank"))
    history = MemLongChatMessageHistory(ml, "alice")
    history.add_messages([HumanMessage("My code is 1234."), AIMessage("Noted.")])
    other = MemoryBank.load(tmp_path / "bank", embedder=ml.bank.embedder)  # a second writer (another process)
    other.reset("chat:alice")
    other.commit()
    for _ in range(2):  # and a retry
        with pytest.raises(ValueError, match="committed by another writer"):
            history.add_messages([HumanMessage("My dog is Pixel."), AIMessage("Nice.")])
        assert [m.content for m in history.messages] == ["My code is 1234.", "Noted."]  # nothing of the failed call
    with pytest.raises(ValueError, match="needs a disk bank"):
        MemLongChatMessageHistory(make_tiny()[0], "bob", commit=True)
    with pytest.raises(ValueError, match="empty ai message"):
        history.add_messages([AIMessage("", tool_calls=[{"name": "f", "args": {}, "id": "1"}]),
                              ToolMessage("3", tool_call_id="1")])


def test_warnings_skip_any_langchain_package_calling_the_store(tiny, tmp_path, monkeypatch):
    """Diff review: only langchain_core's frames were skipped; an eviction through another LangChain package (e.g.
    langchain_classic's ParentDocumentRetriever adding documents) pointed into that package."""
    import sys
    import warnings

    from memlong import MemoryEvictionWarning

    package = tmp_path / "langchain_elsewhere"
    package.mkdir()
    (package / "__init__.py").write_text("def add(store, texts):\n    return store.add_texts(texts)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import langchain_elsewhere

    tiny.bank.capacity = 64
    store = MemLongVectorStore(tiny, namespace="small")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            langchain_elsewhere.add(store, [TEXT[:300]])
    files = {w.filename for w in caught if issubclass(w.category, MemoryEvictionWarning)}
    sys.modules.pop("langchain_elsewhere")
    assert files == {__file__}
