"""`MemLongMemoryBlock`: a LlamaIndex ``Memory`` block that keeps old chat turns in the bank as K-V.

When LlamaIndex's ``Memory`` flushes turns out of its short-term FIFO, this block streams them through
``MemLong.ingest`` into its namespace (one bank document per flush, ``"role: text"`` lines). When the memory
is read, it searches those turns with the latest user message and hands back one system message whose
``additional_kwargs`` carry the chunk ids (``memlong_chunk_ids``) and ``memlong_text_in_memory=True``:
:class:`MemLongLLM` attends to those turns' K-V and does not re-encode their text; any other LLM just reads
the text, which the message also carries.

Durable: on a disk bank (``memory_path``) each ``put`` and ``reset`` commits (``commit=False``: the caller does).
LlamaIndex's ``Memory`` marks the turns it flushes as archived in its own store *before* it hands them to the block,
so a crash between the two loses those turns from both (the window is one ingest and commit). Past
``memory_capacity`` tokens old turns are evicted chunk by chunk by the bank's rule.

Example:
    >>> from llama_index.core.memory import Memory
    >>> block = MemLongMemoryBlock(memlong=ml, namespace="chat-alice", top_k=2)
    >>> memory = Memory.from_defaults(session_id="alice", token_limit=400, memory_blocks=[block])
    >>> memory.put_messages([...])                  # old turns flow into the bank as K-V
    >>> llm.chat(memory.get(input="What did I say my dog's name was?"))
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr
from llama_index.core.memory.memory import BaseMemoryBlock

from memlong import MemLong
from memlong_integrations._durable import check_commit, commit_change
from memlong_integrations._threads import in_thread
from memlong_integrations.llama_index._common import checked_memlong
from memlong_integrations.llama_index.llm import CHUNK_IDS_KWARG, NAMESPACE_KWARG, TEXT_IN_MEMORY_KWARG

__all__ = ["MemLongMemoryBlock"]


class MemLongMemoryBlock(BaseMemoryBlock[list[ChatMessage]]):
    """Long-term chat memory in a MemLong bank namespace, handed back by chunk id.

    Args:
        memlong: the model whose bank keeps the turns (their K-V is computed with it).
        namespace: bank namespace for this conversation (or user).
        top_k: chunks of past turns handed back per read.
        header: first line of the text the memory message carries for LLMs that read text.
        commit: commit the bank after each change (default ``None``: when it is a disk bank).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")  # a misspelt option is an error
    name: str = Field(default="memlong_chat_memory", description="The name of the memory block.")
    namespace: str = Field(default_factory=lambda: f"chat-{uuid.uuid4().hex}",
                           description="Bank namespace holding the past turns (default: a new one per block, so "
                                       "that blocks without a namespace never share one).")
    top_k: int = Field(default=2, gt=0, description="Past-turn chunks handed back per read.")
    header: str = Field(default="Earlier in this conversation:", description="Header of the memory message.")
    commit: bool | None = Field(default=None, description="Commit the bank after each change (None: a disk bank).")

    _memlong: MemLong = PrivateAttr()

    def __init__(self, memlong: MemLong, **kwargs: Any) -> None:
        memlong = checked_memlong("MemLongMemoryBlock", memlong)  # Memory counts tokens with tiktoken
        super().__init__(**kwargs)
        check_commit(memlong.bank, self.commit, "MemLongMemoryBlock")
        self._memlong = memlong

    @staticmethod
    def _render(messages: list[ChatMessage]) -> str:
        lines = []
        for message in messages:
            if (message.additional_kwargs or {}).get(TEXT_IN_MEMORY_KWARG):
                continue  # a memory message we produced: its text is in the bank already
            text = (message.content or "").strip()
            if text:
                role = message.role.value if isinstance(message.role, MessageRole) else str(message.role)
                lines.append(f"{role}: {text}")
        return "\n".join(lines)

    def put(self, messages: list[ChatMessage]) -> list[str]:
        """Write turns to the bank now (what ``Memory`` does on flush); returns the new chunk ids."""
        text = self._render(messages)
        if not text:
            return []
        ids = self._memlong.ingest([text], namespace=self.namespace, metadatas=[{"memlong_kind": "chat"}],
                                   progress=False).chunk_ids
        commit_change(self._memlong.bank, self.commit, self.namespace, ids)
        return ids

    async def _aput(self, messages: list[ChatMessage]) -> None:
        await in_thread(self.put, messages)

    def get(self, messages: list[ChatMessage] | None = None) -> list[ChatMessage]:
        """The memory message for the latest user message (empty list when nothing is stored or asked)."""
        bank = self._memlong.bank
        query = next((m.content for m in reversed(messages or []) if m.role == MessageRole.USER and m.content), None)
        with bank.reading():  # a hit deleted by another thread before it is read: never
            if not query or not bank.num_tokens(self.namespace):  # (chunk_ids sorted the namespace to count it)
                return []
            hits = bank.search(query, namespace=self.namespace, k=self.top_k)
            chunks = sorted((bank.get(h.chunk_id, namespace=self.namespace) for h in hits), key=lambda c: c.order)
        text = "\n".join([self.header, *(c.text.strip() for c in chunks)])
        return [ChatMessage(role=MessageRole.SYSTEM, content=text,
                            additional_kwargs={CHUNK_IDS_KWARG: [c.id for c in chunks], TEXT_IN_MEMORY_KWARG: True,
                                               NAMESPACE_KWARG: self.namespace})]

    async def _aget(self, messages: list[ChatMessage] | None = None, **block_kwargs: Any) -> list[ChatMessage]:
        return await asyncio.to_thread(self.get, messages)

    def reset(self) -> None:
        """Forget the turns this block stored (its namespace of the bank). LlamaIndex's ``Memory.reset()`` clears
        only its own message store, not its blocks: call this too when a session ends, or the turns stay in the
        bank (in memory, and in its ``max_bytes``) for as long as the model lives.

        Example:
            >>> memory.reset(); block.reset()
        """
        self._memlong.bank.reset(self.namespace)
        commit_change(self._memlong.bank, self.commit, self.namespace)

    async def areset(self) -> None:
        """:meth:`reset` in a worker thread."""
        await in_thread(self.reset)
