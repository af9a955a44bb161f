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
