"""RAG with LangChain: passages stored as K-V in a MemLong vector store; the chain hands the retrieved
chunks to the model as K-V, so only the question is encoded."""
from langchain_core.documents import Document

from memlong import MemLong
from memlong_integrations.langchain import ChatMemLong, MemLongVectorStore, create_memlong_rag_chain

passages = {
    "harbour": "The harbour gate opens at dawn and closes at dusk. Fishing boats wait outside it in the fog. "
               "The password of the harbour gate is marigold.",
    "tower": "Falcons nest in the northern tower every spring. Its stairs are narrow and steep. "
             "The keeper of the iron key is Tobias Wren, who lives at the top of the tower.",
    "chapel": "The abbey bell rings at noon. Saffron is stored in the silver chest beneath the west chapel, "
              "and the copper lamp lights the chapel at night.",
}
ml = MemLong.from_pretrained("default", top_k=4)
store = MemLongVectorStore(ml, namespace="docs")
store.add_documents([Document(text, metadata={"source": name}) for name, text in passages.items()])  # K-V here
retriever = store.as_retriever(search_kwargs={"k": 2})
chat = ChatMemLong(memlong=ml, namespace="docs", max_tokens=32)

out = create_memlong_rag_chain(retriever, chat).invoke("Who keeps the iron key?")
print("answer:", out["answer"])
print("sources:", [d.metadata["source"] for d in out["context"]], "| prompt tokens:", ml.last_generation.prompt_tokens)
