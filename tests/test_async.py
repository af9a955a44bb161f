"""Async calls of the adapters stop decoding when the task that awaits them is cancelled (a web request's timeout).

Async review: the non-streaming calls (LlamaIndex ``acomplete`` / ``achat``, LangChain ``MemLongLLM.ainvoke``) ran the
whole answer in one worker-thread call, which decoded on to ``max_new_tokens`` after the caller had gone, and slowed
the requests after it. Every token step here takes 20 ms, so a whole answer would take 4 s."""

import asyncio
import time

import pytest
from langchain_core.messages import HumanMessage
from llama_index.core.base.llms.types import ChatMessage

from memlong import generation
from memlong_integrations.langchain import ChatMemLong
from memlong_integrations.langchain import MemLongLLM as LangChainLLM
from memlong_integrations.llama_index import MemLongLLM as LlamaIndexLLM

STEPS = 200


@pytest.fixture()
def slow(make_tiny, monkeypatch):
    ml, _ = make_tiny(chunk_size=16, local_window=512)
    monkeypatch.setattr(ml, "eos_ids", frozenset())  # the random tiny model must not end its answers early
    real = generation._next_token

    def slow_token(scores, temperature, generator):
        time.sleep(0.02)
        return real(scores, temperature, generator)

    monkeypatch.setattr(generation, "_next_token", slow_token)
    return ml


CALLS = {
    "llama_index acomplete": lambda ml: LlamaIndexLLM(ml, max_new_tokens=STEPS).acomplete("Once upon a time"),
    "llama_index achat": lambda ml: LlamaIndexLLM(ml, max_new_tokens=STEPS).achat(
        [ChatMessage(role="user", content="Once upon a time")]),
    "langchain MemLongLLM.ainvoke": lambda ml: LangChainLLM(memlong=ml, max_tokens=STEPS).ainvoke("Once upon a time"),
    "langchain ChatMemLong.ainvoke": lambda ml: ChatMemLong(memlong=ml, max_tokens=STEPS).ainvoke(
        [HumanMessage("Once upon a time")]),
}


@pytest.mark.parametrize("call", list(CALLS))
async def test_a_cancelled_call_stops_decoding(slow, call):
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(CALLS[call](slow), timeout=0.5)
    await asyncio.sleep(0.3)  # the token step in flight at the cancellation finishes
    stopped = slow.last_generation.new_tokens
    await asyncio.sleep(0.5)  # 25 more steps, were it still decoding
    assert slow.last_generation.new_tokens == stopped < STEPS // 4


LONG = " ".join(f"Entry {i} of the ledger records {i * 7 % 13} barrels of salt." for i in range(300))


class Steps(list):
    fast = False


@pytest.fixture()
def slow_steps(make_tiny, monkeypatch):
    """A tiny model whose ingest steps take 100 ms more until ``steps.fast`` is set, and the steps it ran."""
    from memlong.streaming import Stream

    ml, _ = make_tiny(chunk_size=16, local_window=512)
    steps, real = Steps(), Stream.step

    def slow_step(self, tokens, **kwargs):
        time.sleep(0 if steps.fast else 0.1)
        steps.append(len(tokens))
        return real(self, tokens, **kwargs)

    monkeypatch.setattr(Stream, "step", slow_step)
    return ml, steps


def _writes():
    from langchain_core.documents import Document
    from llama_index.core.schema import TextNode

    from memlong_integrations.langchain import MemLongChatMessageHistory
    from memlong_integrations.langchain import MemLongVectorStore as LangChainStore
    from memlong_integrations.llama_index import MemLongMemoryBlock, MemLongVectorStore

    return {
        "llama_index async_add": lambda ml: MemLongVectorStore(ml, show_progress=False).async_add([TextNode(text=LONG)]),
        "llama_index memory aput": lambda ml: MemLongMemoryBlock(ml, namespace="chat").aput(
            [ChatMessage(role="user", content=LONG)]),
        "langchain aadd_texts": lambda ml: LangChainStore(ml).aadd_texts([LONG], ids=["ledger"]),
        "langchain aadd_documents": lambda ml: LangChainStore(ml).aadd_documents([Document(LONG, id="ledger")]),
        "langchain afrom_texts": lambda ml: LangChainStore.afrom_texts([LONG], memlong=ml),
        "langchain afrom_documents": lambda ml: LangChainStore.afrom_documents([Document(LONG)], memlong=ml),
        "langchain history aadd_messages": lambda ml: MemLongChatMessageHistory(ml, "s").aadd_messages(
            [HumanMessage(LONG)]),
    }


@pytest.mark.parametrize("write", list(_writes()))
async def test_a_cancelled_write_stops_ingesting_and_keeps_nothing(slow_steps, write):
    """Async review: a cancelled async add (asyncio.to_thread) went on ingesting and wrote every chunk, so a retry
    after a timeout added the entries twice."""
    ml, steps = slow_steps
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(_writes()[write](ml), timeout=0.4)
    assert not [ns for ns in ml.bank.namespaces() if ml.bank.chunk_ids(ns)]  # the rollback is done already
    ran = len(steps)
    await asyncio.sleep(0.35)  # 3 more steps, were it still ingesting
    assert len(steps) == ran and sum(steps) < len(ml.tokenize(LONG))
    steps.fast = True
    await _writes()[write](ml)  # the retry writes the whole text, once
    written = [ns for ns in ml.bank.namespaces() if ml.bank.chunk_ids(ns)]
    assert len(written) == 1 and len({c.doc_id for c in ml.bank.chunks(written[0])}) == 1
    assert ml.bank.chunks(written[0])[-1].text.rstrip().endswith("records 0 barrels of salt.")  # to its end
