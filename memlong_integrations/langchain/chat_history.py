"""`MemLongChatMessageHistory`: a LangChain chat message history stored in a MemLong bank as K-V.

Contract: every added message is ingested into the history's namespace (one bank document per message, its turn
rendered as ``"\\nQuestion: ..."`` / ``"\\nAnswer: ..."`` so that retrieved turns read like the plain prompt of
:class:`ChatMemLong`), with the serialized message in the chunks' metadata. ``messages`` returns them in order,
exactly as added (an empty AI answer is not stored: it has nothing to read back); ``clear()`` resets the namespace.
A :class:`ChatMemLong` reading the same namespace retrieves the relevant past turns as K-V (``retrieve=True``), so a
long conversation is never re-encoded: give the model only the new question.

Durable: on a disk bank (``memory_path`` / ``MemoryBank(path=...)``) each ``add_messages`` and ``clear`` commits
(``commit=False``: the caller commits, e.g. once per batch of sessions), so the history survives a restart or a
crash after the call returns; a commit that fails (another writer committed to the directory: one writer per
directory) undoes the call's messages and raises. The commit saves all the bank holds, another thread's ingest in
progress included. A bank in memory is saved with ``ml.save_memory`` as usual. Past ``memory_capacity``
tokens a session evicts messages by the bank's rule (oldest share, then the least retrieved): the history then has
gaps, a question kept without its answer; give chat sessions a capacity that holds them.

Example:
    >>> history = MemLongChatMessageHistory(memlong=ml, session_id="alice")
    >>> history.add_messages([HumanMessage("My locker code is 4417."), AIMessage("Noted.")])
    >>> chat = ChatMemLong(memlong=ml, namespace=history.namespace, retrieve=True)
    >>> chat.invoke("What is my locker code?")          # past turns come in as retrieved K-V

With ``RunnableWithMessageHistory`` use the K-V-only form: the prompt holds only the question (no
``MessagesPlaceholder``: that would paste the past turns as text as well), the history writes each turn to the
bank, and the model retrieves what it needs. Each session reads its own namespace: the model's ``namespace``
comes from the same ``session_id`` as the history's (a fixed namespace would let one session retrieve another's
turns)::

    chat = ChatMemLong(memlong=ml, retrieve=True).configurable_fields(namespace=ConfigurableField(id="session_id"))
    chain = RunnableWithMessageHistory(
        ChatPromptTemplate.from_messages([("human", "{question}")]) | chat,
        lambda session_id: MemLongChatMessageHistory(ml, session_id, prefix=""),  # namespace == session_id
        input_messages_key="question", history_messages_key="history")
    chain.invoke({"question": "What is my locker code?"}, config={"configurable": {"session_id": "chat:alice"}})

Without a runnable: ``chat.bind(memlong_namespace=history.namespace)`` per session.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, message_to_dict, messages_from_dict

from memlong import MemLong
from memlong.upsert import ingest_entries
from memlong_integrations._durable import check_commit, commit_change
from memlong_integrations._threads import in_thread

__all__ = ["MemLongChatMessageHistory"]

_MESSAGE_KEY = "_memlong_message"
_ROLES = {"human": "Question", "ai": "Answer"}


def _kind(message: BaseMessage) -> str:
    """"human" / "ai" also for a streamed turn's chunk classes (``AIMessageChunk``'s type is "AIMessageChunk",
    which was stored as "Aimessagechunk: ..."); other messages by their type."""
    return "ai" if isinstance(message, AIMessage) else "human" if isinstance(message, HumanMessage) else message.type


class MemLongChatMessageHistory(BaseChatMessageHistory):
    """Chat history whose turns live in a MemLong memory bank (text, embedding and K-V per chunk).

    Args:
        memlong: the MemLong model that computes the turns' K-V (and will read them).
        session_id: one conversation; its namespace is ``f"{prefix}{session_id}"``.
        prefix: namespace prefix.
        commit: commit the bank after each change (default ``None``: when it is a disk bank).
    """

    def __init__(self, memlong: MemLong, session_id: str, *, prefix: str = "chat:", commit: bool | None = None) -> None:
        if not isinstance(session_id, str) or not session_id:
            raise ValueError(f"session_id must be a non-empty string, got {session_id!r}.")
        if not isinstance(memlong, MemLong):  # (anything was accepted; the first message failed, unclearly)
            raise TypeError(f"MemLongChatMessageHistory needs a memlong.MemLong model, got {type(memlong).__name__}. "
                            "Load one with MemLong.from_pretrained(...).")
        check_commit(memlong.bank, commit, "MemLongChatMessageHistory")
        self.memlong = memlong
        self.session_id = session_id
        self.namespace = f"{prefix}{session_id}"
        self.commit = commit

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        bank, seen, out = self.memlong.bank, set(), []
        for chunk in bank.chunks(self.namespace):
            # only turns this class wrote (adapters refuse reserved metadata keys from users' documents)
            if chunk.doc_id not in seen and chunk.doc_id.startswith("msg-") and _MESSAGE_KEY in chunk.metadata:
                seen.add(chunk.doc_id)
                out.append(chunk.metadata[_MESSAGE_KEY])
        return messages_from_dict(out)

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Ingest the messages as K-V (one document per message, in order), then commit a disk bank: all of them,
        or none if anything fails, the commit included. An empty AI answer is skipped (small models give some;
        refusing it lost the question with it); other empty messages (an AI tool call among them) are refused."""
        texts, roles, metas = [], [], []
        for message in messages:
            text = message.text
            if not text.strip():
                if _kind(message) == "ai" and not getattr(message, "tool_calls", None):
                    continue
                raise ValueError(f"Cannot store an empty {message.type} message: it has no text to remember.")
            roles.append(_kind(message))
            texts.append(f"\n{_ROLES.get(roles[-1], roles[-1].capitalize())}: {text}")
            metas.append({_MESSAGE_KEY: message_to_dict(message)})
        if texts:  # atomic: every message or none; each message's dict stored once, on its first chunk
            added = ingest_entries(self.memlong, texts, namespace=self.namespace, progress=False,
                                   metadatas=[{"role": r} for r in roles], entry_metadata=metas,
                                   doc_ids=[f"msg-{uuid.uuid4()}" for _ in texts])
            commit_change(self.memlong.bank, self.commit, self.namespace, [c for ids in added for c in ids])

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        """:meth:`add_messages` in a worker thread; cancelling the await stops the ingest and adds nothing."""
        await in_thread(self.add_messages, messages)

    def chunk_ids(self) -> list[str]:
        """All chunk ids of this conversation (e.g. to attend to the whole history explicitly)."""
        return self.memlong.bank.chunk_ids(self.namespace)

    def clear(self) -> None:
        self.memlong.bank.reset(self.namespace)
        commit_change(self.memlong.bank, self.commit, self.namespace)
