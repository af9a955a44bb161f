"""`ChatMemLong`: a LangChain chat model over a :class:`memlong.MemLong` decoder.

Contract:
    * Messages are rendered to one prompt; only that prompt is encoded. Retrieved chunks enter the retrieval
      layers as their stored K-V when you give them: the call keyword ``memlong_chunk_ids`` (``invoke``,
      ``stream``, ``.bind(...)``; :func:`create_memlong_rag_chain` does it for you). With no ids the model reads
      exactly the messages it is given, like any chat model, unless ``retrieve=True``: then it retrieves
      ``top_k`` chunks of ``namespace`` with the last human message as the query (e.g. a chat history kept in
      the bank, :class:`MemLongChatMessageHistory`).
    * Answers carry no stop string, not even its start (text that may begin one is held back while streaming),
      and no surrounding whitespace; a line break before the answer's first word does not end it (small
      models often start with one). An answer of nothing is ``""``.
    * ``memlong_namespace`` (call keyword) overrides the ``namespace`` field for one call.
    * A trailing ``AIMessage`` is a prefill: the answer continues it (e.g. ``"The password is"``); the prefill is
      not repeated in the output. Small models answer far better when the form of the answer is forced: with
      chunks attended and no prefill of yours, the plain layout prefills ``kv_answer_prefix``
      (``"According to the text,"``).
    * Prompt layout (``prompt_format``): ``"plain"`` renders a continuation prompt ``"\\nQuestion: ...\\nAnswer:"``
      right after the memory and stops at ``PLAIN_STOP`` (the next question or a blank line); ``"chat"`` uses
      the tokenizer's chat template; ``"auto"`` (default) uses ``plain`` when chunks are attended or the tokenizer
      has no chat template, and ``chat`` otherwise. Measured on the default 135M model: behind a chat
      template the model tends to ignore memory (README, "LangChain").
    * ``usage_metadata``: ``input_tokens`` = prompt tokens encoded + memory tokens attended, the latter also
      reported as ``input_token_details["cache_read"]`` (they were read from the bank, not encoded; with
      ``kv_refresh``, less the re-encoded ones);
      ``output_tokens`` = generated tokens. ``response_metadata["memlong"]`` is a dict of the call's
      :class:`memlong.GenerationStats`: ``namespace``, ``chunk_ids``, ``prompt_tokens``, ``memory_tokens``,
      ``refreshed_tokens``, ``time_to_first_token``, ``seconds`` (``finish_reason`` is in ``response_metadata``).
    * Text only: ``bind_tools`` and ``with_structured_output`` raise ``NotImplementedError`` saying what to use
      instead; multimodal content raises ``ValueError``.

Example:
    >>> from memlong import MemLong
    >>> from memlong_integrations.langchain import ChatMemLong
    >>> ml = MemLong.from_pretrained("default", top_k=4)
    >>> ml.ingest(open("hamlet.txt").read(), namespace="hamlet")
    >>> chat = ChatMemLong(memlong=ml, namespace="hamlet", max_tokens=32)
    >>> chat.invoke("Who killed Polonius?").content               # the question alone, no memory
    >>> ChatMemLong(memlong=ml, namespace="hamlet", retrieve=True).invoke("Who killed Polonius?")  # retrieves
    >>> ids = [h.chunk_id for h in ml.bank.search("Polonius", namespace="hamlet", k=4)]
    >>> chat.invoke("Who killed Polonius?", memlong_chunk_ids=ids)  # explicit chunks
    >>> for chunk in chat.bind(memlong_chunk_ids=ids).stream("Who is Ophelia?"):
    ...     print(chunk.content, end="")
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import AliasChoices, ConfigDict, Field, model_validator

from memlong import GenerationStats, MemLong
from memlong.generation import retrieve_ids
from memlong.prompts import PLAIN_STOP, chat_prompt, plain_prompt
from memlong_integrations._answer import KV_ANSWER_PREFIX, answer_pieces, call_max_tokens, call_option, stop_strings
from memlong_integrations.langchain._common import chunk_id_list, drop_remote_options, not_supported, stepped

__all__ = ["ChatMemLong", "PLAIN_STOP"]

PromptFormat = Literal["auto", "chat", "plain"]
_CALL_KEYWORDS = {"memlong_chunk_ids", "memlong_namespace", "model", "stream", "max_tokens", "max_new_tokens",
                  "temperature", "seed"}  # (a call's temperature and seed: as LlamaIndex's MemLongLLM, and ChatOpenAI)


def _text(message: BaseMessage) -> str:
    """Plain text of a message; refuses content the model cannot read."""
    if isinstance(message.content, list):
        others = [b.get("type") for b in message.content if isinstance(b, dict) and b.get("type") != "text"]
        if others:
            raise ValueError(f"ChatMemLong reads text only; the message has {sorted(set(map(str, others)))} blocks. "
                             "Send text content.")
    return message.text


def _role(message: BaseMessage) -> str:
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, AIMessage):
        if message.tool_calls:
            raise ValueError("ChatMemLong does not support tool calling; remove tool calls from the history.")
        return "assistant"
    raise ValueError(f"ChatMemLong takes system, human and AI messages, not {message.type!r} messages.")


class ChatMemLong(BaseChatModel):
    """Chat model over a MemLong decoder whose retrieval layers read retrieved chunks as stored K-V.

    Setup:
        ``pip install memlong`` (the default model ships offline; see README).

    Instantiate:
        .. code-block:: python

            from memlong import MemLong
            from memlong_integrations.langchain import ChatMemLong

            ml = MemLong.from_pretrained("default", top_k=4)
            chat = ChatMemLong(memlong=ml, namespace="docs", max_tokens=64, temperature=0)

    Invoke:
        .. code-block:: python

            chat.invoke("What is the password of the harbour gate?")
            chat.invoke("What is the password of the harbour gate?", memlong_chunk_ids=ids)
            chat.bind(memlong_chunk_ids=ids).invoke([("human", "What is the password?"),
                                                     ("ai", "The password of the harbour gate is")])

    Stream:
        .. code-block:: python

            for chunk in chat.stream("Who is the keeper of the iron key?"):
                print(chunk.content, end="")

    Usage metadata:
        .. code-block:: python

            msg = chat.invoke("...", memlong_chunk_ids=ids)
            msg.usage_metadata   # {'input_tokens': 12 + 512, 'output_tokens': 9, ...,
                                 #  'input_token_details': {'cache_read': 512}}
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True, extra="forbid")

    memlong: MemLong = Field(exclude=True)
    """The MemLong model (decoder, tokenizer and memory bank)."""
    namespace: str = "default"
    """Memory namespace the model reads (retrieval and explicit chunk ids)."""
    model_name: str | None = Field(default=None, alias="model")
    """Name reported in metadata; defaults to the decoder's name or path."""
    temperature: float = 0.0
    """0 = greedy decoding; otherwise sampling with this temperature."""
    max_tokens: int = Field(default=256, validation_alias=AliasChoices("max_tokens", "max_new_tokens"))
    """Most tokens to generate (``max_new_tokens`` is accepted too; a call's ``max_tokens`` overrides it)."""
    stop: list[str] | None = None
    """Default stop sequences (combined with the per-call ``stop``)."""
    seed: int | None = None
    """Sampling seed (``temperature > 0``)."""
    streaming: bool | None = None
    """``True``: stream in ``invoke`` too (tokens reach ``on_llm_new_token``); ``False``: never stream, not even in
    ``stream()`` (LangChain's meaning of an explicit ``False``); ``None``: stream in ``stream()`` only. (A default of
    ``False`` was explicit in the copies ``configurable_fields`` builds, so they never streamed.)"""
    retrieve: bool = False
    """With no ``memlong_chunk_ids``, retrieve ``top_k`` chunks of the namespace for the last human message.
    Off by default: used as a plain chat model (a stock LCEL chain that pastes text), it reads only its input."""
    top_k: int | None = Field(default=None, ge=0)
    """Chunks retrieved when no ids are given; ``None`` = the MemLong config's ``top_k``."""
    kv_answer_prefix: str = KV_ANSWER_PREFIX
    """Prefilled answer start in the plain layout when chunks are attended and the messages bring no prefill of
    their own (a trailing AI message); not part of the output. Small models read memory far better with one;
    ``""`` turns it off."""
    prompt_format: PromptFormat = "auto"
    """``"plain"`` continuation prompt, ``"chat"`` template, or ``"auto"`` (plain with memory, chat without)."""

    @model_validator(mode="before")
    @classmethod
    def _drop_remote_options(cls, values: Any) -> Any:
        """LangChain's remote-only standard options are accepted with no effect; other unknowns raise."""
        return drop_remote_options(values)

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        if not isinstance(self.memlong, MemLong):
            raise TypeError(f"memlong must be a memlong.MemLong, got {type(self.memlong).__name__}.")
        if self.model_name is None:
            self.model_name = Path(str(getattr(self.memlong.model.config, "name_or_path", "") or "memlong")).name
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}.")

    # ------------------------------------------------------------------ LangChain metadata
    @property
    def _llm_type(self) -> str:
        return "memlong-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        cfg = self.memlong.config
        return {"model_name": self.model_name, "namespace": self.namespace, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "prompt_format": self.prompt_format, "top_k": self._top_k(),
                "kv_source": cfg.kv_source, "position_layout": cfg.position_layout, "local_window": cfg.local_window}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="memlong", ls_model_type="chat",
                                 ls_model_name=kwargs.get("model") or self.model_name,
                                 ls_temperature=self.temperature, ls_max_tokens=self.max_tokens)
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` by the served model's own tokenizer (LangChain's default is GPT-2's, which counts
        nothing offline): ``get_num_tokens``, ``get_num_tokens_from_messages`` and ``trim_messages`` use it."""
        return self.memlong.tokenize(text)

    def _top_k(self) -> int:
        return self.memlong.config.top_k if self.top_k is None else self.top_k

    # ------------------------------------------------------------------ prompt
    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Everything one generation needs: the chunk ids, the prompt text, the prefill and the stops."""
        unknown = set(kwargs) - _CALL_KEYWORDS
        if unknown:
            raise TypeError(f"ChatMemLong got unknown call keywords {sorted(unknown)}; it accepts "
                            "memlong_chunk_ids (list of chunk ids), memlong_namespace, max_tokens, temperature "
                            "and seed.")
        limit = call_max_tokens(kwargs, self.max_tokens)
        if kwargs.get("model") not in (None, self.model_name):
            raise ValueError(f"ChatMemLong serves one loaded model ({self.model_name!r}); it cannot switch to "
                             f"{kwargs['model']!r} per call. Build another ChatMemLong for another model.")
        if not messages:
            raise ValueError("No messages: give the model at least one human message.")
        namespace = kwargs.get("memlong_namespace") or self.namespace
        prefill = ""
        if isinstance(messages[-1], AIMessage):  # a trailing AI message is a prefill the answer continues
            prefill, messages = _text(messages[-1]), messages[:-1]
        turns = [(_role(m), _text(m)) for m in messages]
        if not any(role == "user" for role, _ in turns):
            raise ValueError("No human message: give the model a question to answer.")
        question = next(text for role, text in reversed(turns) if role == "user")
        if not question.strip():
            raise ValueError("The question (the last human message) is empty: give the model something to answer.")
        chunk_ids = chunk_id_list(kwargs.get("memlong_chunk_ids"))
        if chunk_ids is None and self.retrieve:  # as MemLong.generate retrieves (config.retrieve_next included)
            chunk_ids = retrieve_ids(self.memlong, question, namespace, k=self._top_k())
        chunk_ids = chunk_ids or []
        templated = bool(getattr(self.memlong.tokenizer, "chat_template", None))  # "auto": plain without a template
        fmt = self.prompt_format if self.prompt_format != "auto" else ("plain" if chunk_ids or not templated else "chat")
        stops = stop_strings(self.stop, stop)
        if fmt == "plain":
            prompt = plain_prompt(turns, after_memory=bool(chunk_ids))
            stops.extend(s for s in PLAIN_STOP if s not in stops)
            if not prefill.strip() and chunk_ids:
                prefill = self.kv_answer_prefix
            prefill = f" {prefill.strip()}" if prefill.strip() else ""
        else:
            prompt = chat_prompt(self.memlong.tokenizer, turns)
        return {"prompt": prompt, "namespace": namespace, "chunk_ids": chunk_ids, "answer_prefix": prefill,
                "stop": tuple(stops), "query": question, "max_tokens": limit,
                "temperature": call_option(kwargs, "temperature", self.temperature),
                "seed": call_option(kwargs, "seed", self.seed)}

    # ------------------------------------------------------------------ what a text model cannot do
    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
        """Not supported: the model has no tool calling."""
        not_supported("ChatMemLong", "tool calling (bind_tools)",
                      "Use a tool-calling chat model for the agent, and ChatMemLong (or create_memlong_rag_chain) "
                      "for answering from retrieved chunks.")

    def with_structured_output(self, schema: Any, **kwargs: Any) -> Any:
        """Not supported: the model has no structured (JSON / tool) output."""
        not_supported("ChatMemLong", "structured output (with_structured_output)",
                      "Ask for the answer's form in a trailing AI prefill message and parse the text, e.g. with "
                      "langchain_core.output_parsers.PydanticOutputParser.")

    def _start(self, messages: list[BaseMessage], stop: list[str] | None,
               kwargs: dict[str, Any]) -> tuple[Iterator[str], GenerationStats, dict[str, Any]]:
        """Validate, retrieve, encode the prompt and read the memory; decoding starts on the first ``next``."""
        with self.memlong.bank.reading():  # what it retrieves is still there when the memory is read
            args = self._prepare(messages, stop, kwargs)
            # stops are applied here, not by the core (it yields text before they complete); the Generation carries
            # this call's own stats, so concurrent calls (batch, async) never mix them up
            pieces = self.memlong.generate(args["prompt"], namespace=args["namespace"], chunk_ids=args["chunk_ids"],
                                           answer_prefix=args["answer_prefix"], query=args["query"],
                                           max_new_tokens=args["max_tokens"], stream=True,
                                           temperature=args["temperature"], seed=args["seed"])
        stats = pieces.stats
        return answer_pieces(pieces, args["stop"], strip=True), stats, args

    def _metadata(self, stats: GenerationStats, args: dict[str, Any]) -> tuple[UsageMetadata, dict[str, Any]]:
        namespace = args["namespace"]
        usage = UsageMetadata(input_tokens=stats.prompt_tokens + stats.memory_tokens, output_tokens=stats.new_tokens,
                              total_tokens=stats.prompt_tokens + stats.memory_tokens + stats.new_tokens,
                              input_token_details={"cache_read": stats.memory_tokens - stats.refreshed_tokens})
        response = {"model_name": self.model_name, "model_provider": "memlong", "finish_reason": stats.finish_reason,
                    "memlong": {"namespace": namespace, "chunk_ids": list(stats.chunk_ids),
                                "prompt_tokens": stats.prompt_tokens, "memory_tokens": stats.memory_tokens,
                                "refreshed_tokens": stats.refreshed_tokens,
                                "time_to_first_token": stats.time_to_first_token, "seconds": stats.seconds}}
        return usage, response

    # ------------------------------------------------------------------ generation
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        pieces, stats, args = self._start(messages, stop, kwargs)
        text = ""
        for piece in pieces:
            text += piece
            if run_manager is not None and self.streaming:
                run_manager.on_llm_new_token(piece)
        usage, response = self._metadata(stats, args)
        message = AIMessage(content=text, usage_metadata=usage, response_metadata=response)
        return ChatResult(generations=[ChatGeneration(message=message)], llm_output={"model_name": self.model_name})

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        pieces, stats, args = self._start(messages, stop, kwargs)
        for piece in pieces:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager is not None:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        usage, response = self._metadata(stats, args)
        yield ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=usage, response_metadata=response,
                                                         chunk_position="last"))

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        text, final = "", None
        async for chunk in self._astream(messages, stop=stop, run_manager=run_manager if self.streaming else None,
                                         **kwargs):
            text += chunk.text
            final = chunk
        message = AIMessage(content=text, usage_metadata=final.message.usage_metadata,
                            response_metadata=final.message.response_metadata)
        return ChatResult(generations=[ChatGeneration(message=message)], llm_output={"model_name": self.model_name})

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        """Decoding runs in a worker thread, one token step at a time, so the event loop stays free."""
        async for chunk in stepped(self._stream(messages, stop=stop, **kwargs), run_manager):
            yield chunk

