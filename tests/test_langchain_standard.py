"""LangChain's standard test suites (langchain-tests) for the MemLong adapters.

Unsupported features are declared through the suites' own properties (no tool calling, structured output:
``has_tool_calling`` / ``has_structured_output``, since ``ChatMemLong`` overrides ``bind_tools`` and
``with_structured_output`` to raise a ``NotImplementedError`` that says what to use instead; no JSON mode or
multimodal input: the defaults; no per-call model override: ``supports_model_override``), so the suites skip those
tests themselves. The vector store and retriever suites run on the tiny random model (answers
do not matter there); the chat model integration suite runs on the real default model.

Running them: the suites' async tests are plain ``async def`` functions, so pytest-asyncio must collect them with
``asyncio_mode = "auto"``. This repository sets it in ``pyproject.toml`` (``[tool.pytest.ini_options]``); to run the
suites from elsewhere (or subclass them in your own project) pass it on the command line::

    python -m pytest -o asyncio_mode=auto tests/test_langchain_standard.py

Without it pytest skips every async test of the suites ("async def functions are not natively supported").
"""

import uuid

import pytest
from langchain_tests.integration_tests import (
    ChatModelIntegrationTests,
    RetrieversIntegrationTests,
    VectorStoreIntegrationTests,
)
from langchain_tests.unit_tests import ChatModelUnitTests

from memlong_integrations.langchain import ChatMemLong, MemLongRetriever, MemLongVectorStore


def test_async_standard_tests_are_collected(request):
    """Issue 18, finding 9: the standard suites' async tests run only with ``asyncio_mode=auto`` (documented above)."""
    assert request.config.getini("asyncio_mode") == "auto"


SENTENCES = ["The harbour gate opens at dawn.", "Falcons nest in the northern tower.", "The abbey bell rings at noon.",
             "Saffron is stored in the silver chest.", "The copper lamp lights the west chapel."]


class _ChatMemLongFeatures:
    """What ChatMemLong does not support, declared for both suites."""

    @property
    def has_tool_calling(self) -> bool:
        return False  # bind_tools is overridden only to say what to use instead (the suite infers support from it)

    @property
    def has_structured_output(self) -> bool:
        return False  # likewise with_structured_output

    @property
    def supports_model_override(self) -> bool:
        return False  # one loaded model per ChatMemLong


class TestChatMemLongUnit(_ChatMemLongFeatures, ChatModelUnitTests):
    @pytest.fixture(autouse=True)
    def _memlong(self, make_tiny):
        self._ml, _ = make_tiny(top_k=2)

    @property
    def chat_model_class(self):
        return ChatMemLong

    @property
    def chat_model_params(self):
        return {"memlong": self._ml, "namespace": "lc-unit"}


@pytest.mark.slow
class TestChatMemLongIntegration(_ChatMemLongFeatures, ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _memlong(self, default_memlong):
        self._ml = default_memlong

    @property
    def chat_model_class(self):
        return ChatMemLong

    @property
    def chat_model_params(self):
        # an empty namespace: plain chat, nothing to retrieve; short answers keep CPU time down
        return {"memlong": self._ml, "namespace": "lc-standard-empty", "max_tokens": 8}


class TestMemLongRetrieverStandard(RetrieversIntegrationTests):
    @pytest.fixture(autouse=True)
    def _bank(self, make_tiny):
        ml, _ = make_tiny()
        ml.ingest(SENTENCES, namespace="lc-retriever", progress=False)
        self._bank_ = ml.bank

    @property
    def retriever_constructor(self):
        return MemLongRetriever

    @property
    def retriever_constructor_params(self):
        return {"bank": self._bank_, "namespace": "lc-retriever", "k": 2}

    @property
    def retriever_query_example(self) -> str:
        return "where is the saffron?"


class TestMemLongVectorStoreStandard(VectorStoreIntegrationTests):
    @pytest.fixture()
    def vectorstore(self, make_tiny):
        ml, _ = make_tiny()
        namespace = f"lc-store-{uuid.uuid4().hex[:8]}"
        yield MemLongVectorStore(ml, namespace=namespace)
        ml.reset(namespace)
