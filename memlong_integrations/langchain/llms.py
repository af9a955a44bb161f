"""`MemLongLLM`: a LangChain text-completion ``LLM`` over a :class:`memlong.MemLong` decoder.

Contract: the prompt is continued as is (no template); only the prompt is encoded. Chunks are attended as stored
K-V when given with the call keyword ``memlong_chunk_ids`` (``memlong_namespace`` overrides ``namespace`` for one
call); with none the model reads only the prompt, unless ``retrieve=True`` (then it retrieves ``top_k`` chunks of
``namespace`` with the prompt as the query). Stop strings are not part of the output, not even their start, and
whitespace before the first visible character never triggers one; the completion is otherwise returned as
generated (leading space included). Each completion's ``generation_info`` (on a last, empty streamed chunk) holds
``finish_reason`` and, under ``"memlong"``, the call's statistics as :class:`ChatMemLong`'s ``response_metadata``
has them (namespace, chunk ids, tokens encoded / attended / generated, timings); ``llm_output["token_usage"]`` sums
the calls' ``prompt_tokens`` (prompt encoded + memory attended), ``completion_tokens`` and ``total_tokens``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from pydantic import AliasChoices, ConfigDict, Field, model_validator

from memlong import MemLong
from memlong_integrations._answer import answer_pieces, call_max_tokens, call_option, stop_strings
from memlong_integrations.langchain._common import chunk_id_list, drop_remote_options, stepped

__all__ = ["MemLongLLM"]


class MemLongLLM(LLM):
    """Plain text-completion LLM over MemLong: the prompt is continued as is (no template).

    Setup:
        ``ml = MemLong.from_pretrained("default", top_k=4)``

    Instantiate:
        .. code-block:: python

            from memlong_integrations.langchain import MemLongLLM

            llm = MemLongLLM(memlong=ml, namespace="docs", max_tokens=16)

    Invoke:
        .. code-block:: python

            llm.invoke("\\nQuestion: What is the password of the harbour gate?\\nAnswer:", memlong_chunk_ids=ids)
            llm.invoke("The capital of France is", stop=["."])
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    memlong: MemLong = Field(exclude=True)
    """The MemLong model (decoder, tokenizer and memory bank)."""
    namespace: str = "default"
    """Memory namespace read for explicit chunk ids (and retrieval with ``retrieve=True``)."""
    temperature: float = 0.0
    """0 = greedy decoding."""
    seed: int | None = None
    """Sampling seed (``temperature > 0``), as :class:`ChatMemLong`'s."""
    max_tokens: int = Field(default=256, gt=0, validation_alias=AliasChoices("max_tokens", "max_new_tokens"))
    """Most tokens to generate (``max_new_tokens`` is accepted too; a call's ``max_tokens`` overrides it)."""
    stop: list[str] | None = None
    """Default stop strings (combined with a call's ``stop``)."""
    retrieve: bool = False
    """With no ``memlong_chunk_ids``, retrieve ``top_k`` chunks of the namespace with the prompt as query."""

    @model_validator(mode="before")
    @classmethod
    def _drop_remote_options(cls, values: Any) -> Any:
        """As :class:`ChatMemLong`: LangChain's remote-only options are accepted with no effect; others raise."""
        return drop_remote_options(values)

    @property
    def _llm_type(self) -> str:
        return "memlong"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "retrieve": self.retrieve, "stop": self.stop, "seed": self.seed}

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` by the served model's own tokenizer (as :meth:`ChatMemLong.get_token_ids`)."""
        return self.memlong.tokenize(text)

    def _stream(self, prompt: str, stop: list[str] | None = None, run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[GenerationChunk]:
        unknown = set(kwargs) - {"memlong_chunk_ids", "memlong_namespace", "max_tokens", "max_new_tokens",
                                 "temperature", "seed"}
        if unknown:
            raise TypeError(f"MemLongLLM got unknown call keywords {sorted(unknown)}; it accepts memlong_chunk_ids, "
                            "memlong_namespace, max_tokens, temperature and seed.")
        limit = call_max_tokens(kwargs, self.max_tokens)
        namespace = kwargs.get("memlong_namespace") or self.namespace
        temperature, seed = call_option(kwargs, "temperature", self.temperature), call_option(kwargs, "seed", self.seed)
        pieces = self.memlong.generate(prompt, namespace=namespace,
                                       chunk_ids=chunk_id_list(kwargs.get("memlong_chunk_ids")), retrieve=self.retrieve,
                                       max_new_tokens=limit, temperature=temperature, seed=seed,
                                       stream=True)
        for piece in answer_pieces(pieces, stop_strings(self.stop, stop)):
            yield _chunk(piece, None, run_manager)
        stats = pieces.stats
        # a last, empty chunk carries the call's generation_info (and is the one chunk of an empty answer, without
        # which LangChain's stream() raises "No generation chunks were returned")
        yield _chunk("", {"finish_reason": stats.finish_reason, "memlong": {  # (ChatMemLong's response_metadata)
            "namespace": namespace, "chunk_ids": list(stats.chunk_ids), "prompt_tokens": stats.prompt_tokens,
            "memory_tokens": stats.memory_tokens, "refreshed_tokens": stats.refreshed_tokens,
            "new_tokens": stats.new_tokens, "time_to_first_token": stats.time_to_first_token,
            "seconds": stats.seconds}}, run_manager)

    def _call(self, prompt: str, stop: list[str] | None = None, run_manager: CallbackManagerForLLMRun | None = None,
              **kwargs: Any) -> str:
        return "".join(c.text for c in self._stream(prompt, stop=stop, run_manager=run_manager, **kwargs))

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        return _result([list(self._stream(p, stop=stop, run_manager=run_manager, **kwargs)) for p in prompts])

    async def _agenerate(self, prompts: list[str], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        calls = []
        for prompt in prompts:
            calls.append([c async for c in self._astream(prompt, stop=stop, run_manager=run_manager, **kwargs)])
        return _result(calls)

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        """Decoding runs in a worker thread one token step at a time: the event loop stays free, and a cancelled call
        (a request's timeout) stops decoding within a token."""
        async for chunk in stepped(self._stream(prompt, stop=stop, **kwargs), run_manager):
            yield chunk

    async def _acall(self, prompt: str, stop: list[str] | None = None,
                     run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        return "".join([c.text async for c in self._astream(prompt, stop=stop, run_manager=run_manager, **kwargs)])


def _chunk(text: str, info: dict[str, Any] | None, run_manager: CallbackManagerForLLMRun | None) -> GenerationChunk:
    chunk = GenerationChunk(text=text, generation_info=info)
    if run_manager is not None and text:
        run_manager.on_llm_new_token(text, chunk=chunk)
    return chunk


def _result(calls: list[list[GenerationChunk]]) -> LLMResult:
    """One LLMResult for the streamed chunks of each prompt: its text, the last chunk's generation_info, and the
    token usage of all the calls (``llm_output["token_usage"]``, as OpenAI-style LLMs report it)."""
    generations = [[Generation(text="".join(c.text for c in chunks), generation_info=chunks[-1].generation_info)]
                   for chunks in calls]
    infos = [(g[0].generation_info or {}).get("memlong", {}) for g in generations]
    prompt = sum(i.get("prompt_tokens", 0) + i.get("memory_tokens", 0) for i in infos)
    completion = sum(i.get("new_tokens", 0) for i in infos)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return LLMResult(generations=generations, llm_output={"token_usage": usage})
