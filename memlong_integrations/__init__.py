"""Adapters that put MemLong into LlamaIndex (``memlong_integrations.llama_index``) and LangChain
(``memlong_integrations.langchain``): the memory bank as retriever / vector store / memory, the model as
an LLM that receives retrieved chunks as K-V instead of re-encoded text."""
