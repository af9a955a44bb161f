"""`MemLongLLM`: a LlamaIndex ``CustomLLM`` over a :class:`memlong.MemLong` model.

Contract:
    * Only the prompt is encoded. Retrieved chunks enter the model's retrieval layers as the K-V stored in
      the memory bank, chosen by, in this order:
        1. the ``memlong_chunk_ids`` keyword of ``complete`` / ``chat`` / ... (``[]`` = no memory);
        2. in chat, ids in messages' ``additional_kwargs["memlong_chunk_ids"]`` (all messages, in order);
        3. otherwise nothing: used as a plain LLM (a stock query engine pasting text) it reads exactly its
           prompt. With ``retrieve=True`` it retrieves the namespace's ``top_k`` chunks with the prompt (chat: the
           last user message) as the query.
    * Answers carry no stop string, not even its start (streaming holds back text that may begin one), and no
      surrounding whitespace; a line break before the first word does not end the answer (small models often
      answer ``"Answer:"`` with ``"\\nBartholomew Quince."``, which ``stop=["\\n"]`` would otherwise cut to
      nothing). Streaming an empty answer yields one empty response, as LlamaIndex expects. Chat without a template
      (``chat_template=False``: ``\\nUser: ...\\nAssistant:``) also stops where the model begins another turn.
    * A chat message with ``additional_kwargs["memlong_text_in_memory"] = True`` (what
      :class:`~memlong_integrations.llama_index.MemLongMemoryBlock` produces) carries text that is already in
      the bank: its ids are used, its text is not encoded again. Other LLMs read its text as usual.
    * Ids outside this LLM's namespace (another namespace, a deleted document, an evicted chunk) raise
      :class:`memlong.UnknownChunkError` before any generation; a prompt longer than the local window raises
      ``ValueError``.
    * ``metadata.context_window`` = ``local_window + max_new_tokens`` (capped by the positions the model has
      left after the sink and ``top_k`` chunks): LlamaIndex subtracts ``num_output`` and packs the rest with
      prompt. Retrieved K-V does not count against it. LlamaIndex counts with tiktoken (``cl100k_base``) unless
      ``Settings.tokenizer = llm.tokenize``, and counts packed chunks apart (``simple_summarize`` and
      ``tree_summarize`` overshot by up to 74 model tokens at 12 chunks with the model's tokenizer); an over-full
      prompt is refused with an error naming what to change (``similarity_top_k``, the response mode, the
      tokenizer), never truncated. ``compact`` (the default) splits over-full context into several calls.
    * Prompting (measured on the 135M default model, README "LlamaIndex"): a plain continuation prompt
      (``"\\nQuestion: ...\\nAnswer:"``) uses memory well; the chat template between memory and question makes
      small models ignore it more often.

Example:
    >>> from memlong import MemLong
    >>> from memlong_integrations.llama_index import MemLongLLM
    >>> ml = MemLong.from_pretrained("default", top_k=4)
    >>> stats = ml.ingest(long_text, namespace="docs")
    >>> llm = MemLongLLM(ml, namespace="docs", max_new_tokens=32)
    >>> llm.complete("\\nQuestion: ...\\nAnswer:", memlong_chunk_ids=stats.chunk_ids[:4]).text  # explicit chunks
    >>> MemLongLLM(ml, namespace="docs", retrieve=True).complete("\\nQuestion: Who is the keeper of the iron key?"
    ...                                                          "\\nAnswer:").text              # retrieves itself
    >>> for piece in llm.stream_complete("\\nQuestion: ...\\nAnswer:"):
    ...     print(piece.delta, end="")
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Iterator, Sequence
from typing import Any

import torch
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from pydantic import AliasChoices

from memlong import GenerationStats, MemLong, PromptTooLongError
from memlong.prompts import ROLE_STOP, chat_prompt, role_prompt
from memlong_integrations._answer import answer_pieces, call_max_tokens, call_option, stop_strings
from memlong_integrations.llama_index._common import checked_memlong

__all__ = ["CHUNK_IDS_KWARG", "NAMESPACE_KWARG", "TEXT_IN_MEMORY_KWARG", "MemLongLLM"]

CHUNK_IDS_KWARG = "memlong_chunk_ids"  # explicit chunk ids (keyword or message additional_kwargs)
TEXT_IN_MEMORY_KWARG = "memlong_text_in_memory"  # message whose text is already in the bank as K-V
NAMESPACE_KWARG = "memlong_namespace"  # the namespace a message's chunk ids belong to (MemLongMemoryBlock's)
_CONFUSABLE = ("chunk_ids", "namespace", "retrieve", "query", "ids")  # call keywords meant for MemLong.generate
_CALL_OPTIONS = ("max_new_tokens", "max_tokens", "temperature", "seed", "stop")  # a call's own settings
_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "developer": "system"}


class MemLongLLM(CustomLLM):
    """A MemLong model as a LlamaIndex LLM: retrieved chunks are read as stored K-V, not re-encoded text.

    Args:
        memlong: the :class:`memlong.MemLong` model (its bank is the memory).
        namespace: the memory namespace this LLM reads.
        max_new_tokens: generation budget per call (``metadata.num_output``).
        temperature: 0 = greedy decoding.
        seed: sampling seed (``temperature > 0``): the same seed gives the same answer; ``None``: torch's global
            generator.
        retrieve: with no explicit ids, retrieve ``top_k`` chunks from ``namespace`` with the prompt as query
            (default ``False``: the model reads only its prompt).
        stop: strings that end generation.
        chat_template: in ``chat``, render messages with the tokenizer's chat template (``False``: a plain
            ``"User: ...\\nAssistant:"`` transcript, which small models combine with memory better).
    """

    namespace: str = Field(default="default", description="Memory namespace this LLM reads.")
    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not silently ignored

    max_new_tokens: int = Field(default=64, gt=0, description="Tokens generated per call.",
                                validation_alias=AliasChoices("max_new_tokens", "max_tokens"))
    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy.")
    seed: int | None = Field(default=None, description="Sampling seed (temperature > 0).")
    retrieve: bool = Field(default=False, description="Retrieve from the namespace when no ids are given.")
    stop: list[str] = Field(default_factory=list, description="Strings that end generation.")
    chat_template: bool = Field(default=True, description="Render chat messages with the tokenizer's template.")

    _memlong: MemLong = PrivateAttr()

    def __init__(self, memlong: MemLong, **kwargs: Any) -> None:
        memlong = checked_memlong("MemLongLLM", memlong)
        super().__init__(**kwargs)
        self._memlong = memlong

    @classmethod
    def from_pretrained(cls, name_or_path: str = "default", *, namespace: str = "default", **config: Any) -> MemLongLLM:
        """Load a model (``MemLong.from_pretrained(name_or_path, **config)``) and wrap it."""
        return cls(MemLong.from_pretrained(name_or_path, **config), namespace=namespace)

    @classmethod
    def class_name(cls) -> str:
        return "MemLongLLM"

    @property
    def memlong(self) -> MemLong:
        """The wrapped model (``.bank`` is the memory); each response's ``additional_kwargs`` are that call's statistics."""
        return self._memlong

    @property
    def metadata(self) -> LLMMetadata:
        ml = self._memlong
        cfg = ml.config
        left = ml.max_positions - len(ml.sink_ids) - cfg.top_k * cfg.chunk_size
        return LLMMetadata(context_window=max(1, min(cfg.local_window + self.max_new_tokens, left)),
                           num_output=self.max_new_tokens, is_chat_model=False,
                           model_name=str(getattr(ml.model.config, "name_or_path", "memlong")))

    # ------------------------------------------------------------------ core
    def _stream(self, prompt: str, chunk_ids: Sequence[str] | None, query: str | None,
                kwargs: dict[str, Any], layout_stops: Sequence[str] = ()) -> tuple[Iterator[str], GenerationStats]:
        """Validate everything (ids, prompt length) eagerly, then return the text pieces (lazily) and this call's
        own ``GenerationStats`` (filled in as the pieces are read). ``layout_stops``: the prompt layout's own."""
        if chunk_ids is not None and (isinstance(chunk_ids, str) or not all(isinstance(c, str) for c in chunk_ids)):
            raise TypeError(f"{CHUNK_IDS_KWARG} must be a list of chunk id strings, got {chunk_ids!r}.")
        unknown = sorted(k for k in kwargs if k.startswith("memlong_") or k in _CONFUSABLE)
        if unknown:
            raise TypeError(f"Unknown MemLong keyword(s) {unknown}; the chunk ids keyword is {CHUNK_IDS_KWARG!r} "
                            "(the namespace and retrieval are set on the MemLongLLM).")
        unknown = sorted(k for k in kwargs if k not in _CALL_OPTIONS)
        if unknown:  # (a misspelt option was ignored: ``temprature=1.0`` decoded greedily)
            raise TypeError(f"MemLongLLM got unknown call keyword(s) {unknown}; a call takes {CHUNK_IDS_KWARG} "
                            f"and {', '.join(_CALL_OPTIONS)}.")
        max_new = call_max_tokens(kwargs, self.max_new_tokens)
        temperature, seed = call_option(kwargs, "temperature", self.temperature), call_option(kwargs, "seed", self.seed)
        try:
            pieces = self._memlong.generate(
                prompt, namespace=self.namespace, chunk_ids=chunk_ids, retrieve=self.retrieve, query=query,
                max_new_tokens=max_new, temperature=temperature, seed=seed, stream=True)
        except PromptTooLongError as exc:
            raise _too_long(exc) from None
        stops = stop_strings(self.stop, kwargs.get("stop"))  # applied here: the core yields text before they complete
        stops.extend(s for s in layout_stops if s not in stops)
        return answer_pieces(pieces, stops, strip=True), pieces.stats

    def tokenize(self, text: str) -> list[int]:
        """The model's token ids of ``text``: ``Settings.tokenizer = llm.tokenize`` makes LlamaIndex count prompts
        as this model does."""
        return self._memlong.tokenize(text)

    def _prompt(self, prompt: str, formatted: bool) -> str:
        if not formatted and self.completion_to_prompt is not None:
            prompt = self.completion_to_prompt(prompt)
        return prompt

    def _chat_prompt(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
                     ) -> tuple[str, list[str] | None, str | None, tuple[str, ...]]:
        """Render messages to the prompt text; collect chunk ids; the last user message is the retrieval query; the
        layout's stop strings (the role layout's next turn: small models write one, "\nUser: ..." and on)."""
        ids = kwargs.pop(CHUNK_IDS_KWARG, None)
        carried: list[str] = []
        turns = []
        for message in messages:
            extra = message.additional_kwargs or {}
            if extra.get(CHUNK_IDS_KWARG) and extra.get(NAMESPACE_KWARG, self.namespace) != self.namespace:
                raise ValueError(f"A memory message carries chunk ids of namespace {extra[NAMESPACE_KWARG]!r} (a "
                                 f"MemLongMemoryBlock's), but this MemLongLLM reads {self.namespace!r}: build it "
                                 f"with namespace={extra[NAMESPACE_KWARG]!r}, the block's namespace.")
            carried += list(extra.get(CHUNK_IDS_KWARG) or [])
            if extra.get(TEXT_IN_MEMORY_KWARG):
                continue  # its text is in the bank as K-V: attend to it, do not re-encode it
            role = message.role.value if isinstance(message.role, MessageRole) else str(message.role)
            turns.append({"role": _ROLES.get(role, "user"), "content": message.content or ""})
        if ids is None and carried:
            ids = list(dict.fromkeys(carried))
        if not turns:
            raise ValueError("The chat has no message to answer (only memory messages). Add a user message.")
        query = next((t["content"] for t in reversed(turns) if t["role"] == "user"), turns[-1]["content"])
        if not query.strip():  # (it was answered; complete("") and the LangChain chat model refuse it)
            raise ValueError("The chat's last user message is empty; give it the question.")
        tokenizer = self._memlong.tokenizer
        pairs = [(t["role"], t["content"]) for t in turns]
        if self.chat_template and getattr(tokenizer, "chat_template", None):
            return chat_prompt(tokenizer, pairs), ids, query, ()
        return role_prompt(pairs), ids, query, ROLE_STOP

    # ------------------------------------------------------------------ completion
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Complete ``prompt``; ``memlong_chunk_ids=[...]`` picks the chunks to attend to (see module doc)."""
        return self._complete(prompt, formatted, **kwargs)

    # the bodies are undecorated: the async methods run them in a worker thread under their own callback event
    # (calling the decorated sync method there fired a second event and counted every token twice)
    def _complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        ids = kwargs.pop(CHUNK_IDS_KWARG, None)
        pieces, stats = self._stream(self._prompt(prompt, formatted), ids, None, kwargs)
        text = "".join(pieces)
        return CompletionResponse(text=text, additional_kwargs=dataclasses.asdict(stats))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        """Stream the completion of ``prompt`` (``CompletionResponse.delta`` = new text)."""
        return self._stream_complete(prompt, formatted, **kwargs)

    def _stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        ids = kwargs.pop(CHUNK_IDS_KWARG, None)
        pieces, stats = self._stream(self._prompt(prompt, formatted), ids, None, kwargs)

        def gen() -> CompletionResponseGen:
            text = ""
            for piece in pieces:
                text += piece
                yield CompletionResponse(text=text, delta=piece, additional_kwargs=dataclasses.asdict(stats))
            if not text:  # LlamaIndex ends the stream's event with its last item: there must be one
                yield CompletionResponse(text="", delta="", additional_kwargs=dataclasses.asdict(stats))

        return gen()

    # ------------------------------------------------------------------ chat
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Answer the conversation; ids from ``memlong_chunk_ids`` or the messages' ``additional_kwargs``."""
        return self._chat(messages, **kwargs)

    def _chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        prompt, ids, query, layout_stops = self._chat_prompt(messages, kwargs)
        pieces, stats = self._stream(prompt, ids, query, kwargs, layout_stops)
        text = "".join(pieces)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text),
                            additional_kwargs=dataclasses.asdict(stats))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Stream the answer to the conversation (``ChatResponse.delta`` = new text)."""
        return self._stream_chat(messages, **kwargs)

    def _stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        prompt, ids, query, layout_stops = self._chat_prompt(messages, kwargs)
        pieces, stats = self._stream(prompt, ids, query, kwargs, layout_stops)

        def gen() -> ChatResponseGen:
            text = ""
            for piece in pieces:
                text += piece
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=piece,
                                   additional_kwargs=dataclasses.asdict(stats))
            if not text:  # LlamaIndex ends the stream's event with its last item: there must be one
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=""), delta="",
                                   additional_kwargs=dataclasses.asdict(stats))

        return gen()

    # ------------------------------------------------------------------ async (the model runs in a worker thread)
    # the whole answers are collected token by token from worker threads too: a cancelled call (a request's timeout)
    # stops decoding within a token; one thread call for the whole answer decoded to max_new_tokens after it
    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        ids = kwargs.pop(CHUNK_IDS_KWARG, None)
        pieces, stats = await asyncio.to_thread(self._stream, self._prompt(prompt, formatted), ids, None, kwargs)
        text = "".join([piece async for piece in _aiter(pieces)])
        return CompletionResponse(text=text, additional_kwargs=dataclasses.asdict(stats))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        responses = await asyncio.to_thread(self._stream_complete, prompt, formatted, **kwargs)
        return _aiter(responses)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        prompt, ids, query, layout_stops = self._chat_prompt(messages, kwargs)
        pieces, stats = await asyncio.to_thread(self._stream, prompt, ids, query, kwargs, layout_stops)
        text = "".join([piece async for piece in _aiter(pieces)])
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text),
                            additional_kwargs=dataclasses.asdict(stats))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        responses = await asyncio.to_thread(self._stream_chat, messages, **kwargs)
        return _aiter(responses)


def _too_long(exc: PromptTooLongError) -> PromptTooLongError:
    """The core's error with what to change in LlamaIndex (a packed prompt longer than the local window)."""
    return PromptTooLongError(
        f"The prompt is {exc.tokens} tokens, longer than the local window ({exc.window}) of the model. In a LlamaIndex "
        "query engine it holds the retrieved text LlamaIndex pasted: lower similarity_top_k, use "
        "response_mode='compact', set Settings.tokenizer = llm.tokenize (LlamaIndex counts with tiktoken "
        "otherwise), or answer with MemLongQueryEngine (retrieved chunks as K-V: only the question is "
        "encoded). A prompt you wrote: put long context into memory with ingest().", exc.tokens, exc.window)


async def _aiter(items: Iterator[Any]) -> AsyncGenerator[Any, None]:
    """Drive a blocking iterator from worker threads, one item at a time (grad mode is per thread: keep it off)."""
    done = object()

    def step() -> Any:
        with torch.no_grad():
            return next(items, done)

    while True:
        item = await asyncio.to_thread(step)
        if item is done:
            return
        yield item
