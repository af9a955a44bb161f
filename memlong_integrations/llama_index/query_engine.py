"""K-V-injection RAG in LlamaIndex: `MemLongSynthesizer` and `MemLongQueryEngine`.

A stock response synthesizer pastes the retrieved nodes' text into the prompt, and the LLM encodes it all
again. :class:`MemLongSynthesizer` instead reads the chunk ids off the retrieved nodes and calls
:class:`MemLongLLM` with ``memlong_chunk_ids=...`` and a prompt that holds only the question: the retrieval
layers attend to the chunks' K-V stored at ingestion time. ``MemLong.last_generation.prompt_tokens`` is
then the question's tokens, where the text path encodes question + every retrieved chunk.

The swap is one line::

    engine = RetrieverQueryEngine.from_args(retriever, llm=llm)              # text pipeline
    engine = MemLongQueryEngine.from_args(retriever, llm=llm)                # K-V pipeline
    engine = index.as_query_engine(llm=llm, response_synthesizer=MemLongSynthesizer(llm=llm))  # same, from an index

Streaming works as usual (``streaming=True`` -> ``StreamingResponse.response_gen``), and so do ``aquery``
and node postprocessors. The retriever must produce bank chunks (:class:`MemLongRetriever`, or a
``VectorStoreIndex`` over :class:`MemLongVectorStore`) in the LLM's namespace.

Example:
    >>> llm = MemLongLLM(ml, namespace="plays", max_new_tokens=24, stop=["\\n"])
    >>> engine = MemLongQueryEngine.from_args(MemLongRetriever(ml, namespace="plays"), llm=llm)
    >>> response = engine.query("Who is the keeper of the iron key?")
    >>> print(response, ml.last_generation.prompt_tokens)
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Sequence
from typing import Any

from llama_index.core import Settings
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.response.schema import RESPONSE_TYPE
from llama_index.core.callbacks.base import CallbackManager
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.prompts import BasePromptTemplate, PromptTemplate
from llama_index.core.prompts.mixin import PromptDictType
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.response_synthesizers import BaseSynthesizer
from llama_index.core.schema import NodeWithScore
from llama_index.core.types import RESPONSE_TEXT_TYPE

from memlong.prompts import PLAIN_STOP, question_prompt
from memlong_integrations._answer import KV_ANSWER_PREFIX
from memlong_integrations.llama_index._common import chunk_ids_of
from memlong_integrations.llama_index.llm import CHUNK_IDS_KWARG, MemLongLLM

__all__ = ["DEFAULT_KV_PROMPT", "MemLongQueryEngine", "MemLongSynthesizer"]

# retriever options a user may pass to from_args, as to index.as_query_engine(...)
_RETRIEVAL_OPTIONS = {"similarity_top_k", "filters", "vector_store_query_mode", "alpha", "node_ids", "doc_ids"}

# The plain continuation layout (memlong.prompts): the retrieved chunks (as K-V, in document order) flow straight
# into it. It ends with the start of an answer (KV_ANSWER_PREFIX): without one small models often answer nothing.
DEFAULT_KV_PROMPT = PromptTemplate(f"{question_prompt('{query_str}')} {KV_ANSWER_PREFIX}")


EMPTY_RESPONSE = "Empty Response"  # what LlamaIndex's own synthesizers answer when the LLM generates nothing


class MemLongSynthesizer(BaseSynthesizer):
    """A response synthesizer that gives :class:`MemLongLLM` the retrieved chunks' ids instead of their text.

    Args:
        llm: the :class:`MemLongLLM` (same namespace as the retriever).
        prompt_template: the prompt around the question; its only variable is ``{query_str}`` (the chunks are
            not in the prompt). Default: :data:`DEFAULT_KV_PROMPT`.
        streaming: return ``StreamingResponse`` objects.
        empty_response: the answer when no chunk passed retrieval and postprocessing.

    The answer ends at the next ``"\\nQuestion:"`` or blank line (besides the LLM's own stops); an empty
    generation is answered ``"Empty Response"``, as LlamaIndex's own synthesizers do.
    """

    def __init__(self, llm: MemLongLLM, prompt_template: BasePromptTemplate | str | None = None, *,
                 streaming: bool = False, callback_manager: CallbackManager | None = None,
                 empty_response: str | None = None) -> None:
        if not isinstance(llm, MemLongLLM):
            raise TypeError(f"MemLongSynthesizer needs a MemLongLLM (it passes chunk ids, not text), got "
                            f"{type(llm).__name__}. For other LLMs use LlamaIndex's get_response_synthesizer().")
        empty = empty_response or ("No chunk was retrieved for this query (the filters or postprocessors left "
                                   "nothing), so there is nothing to answer from.")
        super().__init__(llm=llm, callback_manager=callback_manager, streaming=streaming, empty_response=empty)
        self._prompt_template = _check_template(prompt_template)

    @property
    def llm(self) -> MemLongLLM:
        return self._llm  # type: ignore[return-value]

    def _get_prompts(self) -> PromptDictType:
        return {"prompt_template": self._prompt_template}

    def _update_prompts(self, prompts: PromptDictType) -> None:
        if "prompt_template" in prompts:
            self._prompt_template = _check_template(prompts["prompt_template"])

    # ------------------------------------------------------------------ carrying ids
    def _ids(self, nodes: Sequence[NodeWithScore]) -> list[str]:
        return chunk_ids_of(list(nodes), namespace=self.llm.namespace)

    def synthesize(self, query: Any, nodes: list[NodeWithScore],
                   additional_source_nodes: Sequence[NodeWithScore] | None = None, **response_kwargs: Any
                   ) -> RESPONSE_TYPE:
        ids = self._ids(nodes)
        return super().synthesize(query, nodes, additional_source_nodes, **{CHUNK_IDS_KWARG: ids}, **response_kwargs)

    async def asynthesize(self, query: Any, nodes: list[NodeWithScore],
                          additional_source_nodes: Sequence[NodeWithScore] | None = None, **response_kwargs: Any
                          ) -> RESPONSE_TYPE:
        ids = self._ids(nodes)
        return await super().asynthesize(query, nodes, additional_source_nodes, **{CHUNK_IDS_KWARG: ids},
                                         **response_kwargs)

    # ------------------------------------------------------------------ answering
    def get_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any) -> RESPONSE_TEXT_TYPE:
        """Answer ``query_str`` attending to ``response_kwargs["memlong_chunk_ids"]`` (``text_chunks`` unused)."""
        ids = response_kwargs.pop(CHUNK_IDS_KWARG, [])
        prompt = self._prompt_template.format(query_str=query_str)
        if self._streaming:
            responses = self.llm.stream_complete(prompt, formatted=True, stop=list(PLAIN_STOP), **{CHUNK_IDS_KWARG: ids})
            return _deltas(responses)
        return (self.llm.complete(prompt, formatted=True, stop=list(PLAIN_STOP), **{CHUNK_IDS_KWARG: ids}).text
                or EMPTY_RESPONSE)

    async def aget_response(self, query_str: str, text_chunks: Sequence[str],
                            **response_kwargs: Any) -> RESPONSE_TEXT_TYPE:
        ids = response_kwargs.pop(CHUNK_IDS_KWARG, [])
        prompt = self._prompt_template.format(query_str=query_str)
        if self._streaming:
            responses = await self.llm.astream_complete(prompt, formatted=True, stop=list(PLAIN_STOP),
                                                        **{CHUNK_IDS_KWARG: ids})
            return _adeltas(responses)
        response = await self.llm.acomplete(prompt, formatted=True, stop=list(PLAIN_STOP), **{CHUNK_IDS_KWARG: ids})
        return response.text or EMPTY_RESPONSE


class MemLongQueryEngine(RetrieverQueryEngine):
    """``RetrieverQueryEngine`` whose synthesizer is :class:`MemLongSynthesizer` (K-V injection)."""

    @classmethod
    def from_args(cls, retriever: BaseRetriever, llm: MemLongLLM | None = None,  # type: ignore[override]
                  response_synthesizer: BaseSynthesizer | None = None,
                  node_postprocessors: list[BaseNodePostprocessor] | None = None,
                  callback_manager: CallbackManager | None = None, *,
                  prompt_template: BasePromptTemplate | str | None = None, streaming: bool = False,
                  **kwargs: Any) -> MemLongQueryEngine:
        """Same call as ``RetrieverQueryEngine.from_args(retriever, llm=...)``; ``llm`` must be a MemLongLLM
        (default: ``Settings.llm``).

        Text-pipeline options (``text_qa_template``, ``response_mode``, ...) have no meaning here and raise.
        """
        unused = sorted(k for k, v in kwargs.items() if v is not None)
        retrieval = [k for k in unused if k in _RETRIEVAL_OPTIONS]
        if retrieval:
            raise TypeError(f"{retrieval} choose what is retrieved: set them on the retriever (index.as_retriever("
                            f"{retrieval[0]}=...) or MemLongRetriever(...)), not on MemLongQueryEngine.from_args.")
        if unused:
            raise TypeError(f"MemLongQueryEngine does not paste text, so {unused} do not apply; "
                            "use prompt_template='...{query_str}...' for the question's prompt.")
        if response_synthesizer is None:
            if llm is None:
                llm = Settings._llm  # as RetrieverQueryEngine.from_args falls back to Settings.llm (unresolved: no OpenAI)
            if llm is None:
                raise ValueError("MemLongQueryEngine.from_args needs a MemLongLLM: pass llm=MemLongLLM(...) or set "
                                 "Settings.llm = MemLongLLM(...).")
            response_synthesizer = MemLongSynthesizer(llm, prompt_template, streaming=streaming,
                                                      callback_manager=callback_manager)
        return cls(retriever=retriever, response_synthesizer=response_synthesizer,
                   node_postprocessors=node_postprocessors, callback_manager=callback_manager)


def _check_template(template: BasePromptTemplate | str | None) -> BasePromptTemplate:
    if template is None:
        return DEFAULT_KV_PROMPT
    if isinstance(template, str):
        template = PromptTemplate(template)
    variables = set(getattr(template, "template_vars", [])) - set(getattr(template, "kwargs", {}) or {})
    if variables != {"query_str"}:
        raise ValueError(f"The K-V prompt template must have exactly one variable, {{query_str}} (the retrieved "
                         f"chunks reach the model as K-V, not as {{context_str}}); got {sorted(variables)}.")
    return template


def _deltas(responses: Any) -> Generator[str, None, None]:
    for response in responses:
        yield response.delta or ""


async def _adeltas(responses: Any) -> AsyncGenerator[str, None]:
    async for response in responses:
        yield response.delta or ""
