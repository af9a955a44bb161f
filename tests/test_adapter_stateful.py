"""A stateful property test of the LangChain vector store as users combine its calls: adds with new, repeated and
random ids (several entries per call), concurrent upserts of one id, deletes, full resets, under a capacity that
keeps evicting, beside a second store on another namespace. Real LangChain classes, the tiny random-weight model.

Invariants after every step:
    * an entry is whole or absent: its chunks, joined, are its text, its first chunk alone carries that text, and
      ``get_by_ids`` returns exactly the text last written under its id (for a race: one of the two);
    * a deleted id is absent until it is written again; the other namespace is never touched;
    * the namespace stays within capacity, and searches return only present entries, as ``get_by_ids`` does.
Bounded for CI: ``max_examples`` x ``stateful_step_count`` steps, no deadline, derandomized.
"""

import functools
import threading
import warnings

import hypothesis.strategies as st
import torch
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from memlong import MemoryEvictionWarning
from memlong_integrations.langchain import MemLongVectorStore
from memlong_integrations.langchain.retrievers import TEXT_KEY

CAPACITY = 112  # tokens: two or three entries of a few 16-token chunks: most adds evict
IDS = ("a", "b", "c", "d")
WORDS = ("falcon", "tower", "harbour", "bell", "saffron", "key", "abbey", "noon", "river", "lantern")
text = st.lists(st.sampled_from(WORDS), min_size=8, max_size=50).map(lambda w: "Entry about " + " ".join(w) + ".")
entry = st.tuples(st.one_of(st.none(), st.sampled_from(IDS)), text)


@functools.lru_cache(maxsize=1)
def _parts():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from memlong import Embedder
    from memlong.default_model import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer, Embedder()


class StoreMachine(RuleBasedStateMachine):
    @initialize()
    def start(self):
        from memlong import MemLong, MemLongConfig

        model, tokenizer, embedder = _parts()
        self.ml = MemLong(model, tokenizer, MemLongConfig(chunk_size=16, local_window=64, top_k=2,
                                                         memory_capacity=CAPACITY, memory_dtype="float32"),
                          embedder=embedder)
        self.store = MemLongVectorStore(self.ml, namespace="vs")
        self.other = MemLongVectorStore(self.ml, namespace="other")
        self.other.add_texts(["The other tenant keeps its lantern by the river."], ids=["o"])
        self.other_chunks = self.ml.bank.chunk_ids("other")
        self.expected: dict[str, set[str]] = {}  # id -> the texts it may hold (one; two after a race)

    def _write(self, ids, texts):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MemoryEvictionWarning)
            return self.store.add_texts(texts, ids=ids)

    @rule(entries=st.lists(entry, min_size=1, max_size=3, unique_by=lambda e: e[0] or object()))
    def add(self, entries):
        ids = [i for i, _ in entries]
        written = self._write(ids, [t for _, t in entries])
        for new_id, (_, t) in zip(written, entries):
            self.expected[new_id] = {t}

    @rule(key=st.sampled_from(IDS), first=text, second=text)
    def race(self, key, first, second):
        start = threading.Barrier(2)
        errors = []

        def write(t):
            start.wait()
            try:
                self._write([key], [t])
            except Exception as e:  # noqa: BLE001 - any failure fails the step
                errors.append(e)

        threads = [threading.Thread(target=write, args=(t,)) for t in (first, second)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert errors == []
        self.expected[key] = {first, second}

    @rule(keys=st.lists(st.sampled_from(IDS), max_size=3))
    def delete(self, keys):
        assert self.store.delete(keys) is True  # missing ids too: LangChain's indexing API reads False as a failure
        for k in keys:
            self.expected.pop(k, None)

    @rule()
    def delete_all(self):
        self.store.delete(None)
        self.expected.clear()

    @rule(query=st.sampled_from(WORDS), k=st.integers(1, 4))
    def search(self, query, k):
        for doc in self.store.similarity_search(query, k=k):
            assert self.store.get_by_ids([doc.id]) == [doc]

    @invariant()
    def entries_are_whole_and_current(self):
        if not hasattr(self, "ml"):
            return
        bank = self.ml.bank
        entries = bank.doc_chunk_ids("vs") if "vs" in bank.namespaces() else {}
        assert set(entries) <= set(self.expected)  # deleted ids stay gone; nothing appears unasked
        for key, chunk_ids in entries.items():
            chunks = [bank.get(c, namespace="vs") for c in chunk_ids]
            stored = chunks[0].metadata.get(TEXT_KEY)
            assert stored in self.expected[key]
            assert all(TEXT_KEY not in c.metadata for c in chunks[1:])
            assert "".join(c.text for c in chunks).strip() == stored
            assert [d.page_content for d in self.store.get_by_ids([key])] == [stored]
        assert bank.num_tokens("vs") <= CAPACITY if entries else True
        assert bank.chunk_ids("other") == self.other_chunks


StoreMachine.TestCase.settings = settings(max_examples=20, stateful_step_count=16, deadline=None, derandomize=True,
                                          suppress_health_check=[HealthCheck.too_slow])
test_vector_store_state_machine = StoreMachine.TestCase
