"""The four ICL conditions, scored on one test sentence at a time (used by :func:`memlong.icl.icl_eval`).

Prompt layout (each part tokenized on its own, so every condition reads exactly the same tokens for the same
text):

* ``zero_shot`` — ``[instruction][query]``;
* ``prompt`` — ``[instruction][k demonstrations][query]``;
* ``prompt+retrieved_text`` — ``[retrieved demonstrations as text][instruction][k demonstrations][query]``:
  the demonstrations memory retrieves for this query, pasted where memory puts them (right after the sink,
  in document order), so the only difference to ``prompt+memory`` is how they are encoded;
* ``prompt+memory`` — ``[instruction][k demonstrations][query]`` attending to the retrieved chunks' stored
  K-V (``MemLong.run(memory=...)``); the retrieved demonstrations are not encoded again.

``prompt_tokens`` per query is the length of the prompt each condition encodes; ``memory_tokens`` the
retrieved K-V tokens attended. For ``zero_shot`` and ``prompt`` the shared prefix is encoded once per seed and
reused as a cache (exact: a causal model's prefix does not depend on what follows); it is still counted in
``prompt_tokens``, which is what a forward without that cache encodes.

Example:
    >>> runner = ConditionRunner(ml, task, prompt_demos, label_ids, store, "similar", 16)
    >>> runner.run("prompt+memory", test)["correct"]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from memlong.icl_memory import DemoStore, demo_text

if TYPE_CHECKING:
    from memlong.icl_data import ICLTask
    from memlong.model import MemLong

__all__ = ["ConditionRunner"]


class ConditionRunner:
    """Scores test sentences under each condition for one seed's prompt demonstrations and memory store."""

    def __init__(self, ml: MemLong, task: ICLTask, prompt_demos: Sequence[tuple[str, str]], label_ids: list[int],
                 store: DemoStore | None, retrieval: str, memory_k: int) -> None:
        self.ml, self.task, self.label_ids = ml, task, label_ids
        self.labels = task.labels
        self.store, self.retrieval, self.memory_k = store, retrieval, memory_k
        self.head = self._ids(task.instruction + "\n\n")
        self.shots = self._ids("".join(demo_text(task.field, t, lab) for t, lab in prompt_demos))
        self._cache: dict[int, Any] = {}  # prefix length -> its captured K-V
        self._hits: dict[str, list[str]] = {}

    def _ids(self, text: str) -> list[int]:
        return self.ml.strip_sink(self.ml.tokenize(text)) if text else []

    def hits(self, text: str) -> list[str]:
        """Chunk ids retrieved for a test sentence (computed once, shared by the memory and pasted conditions)."""
        if text not in self._hits:
            self._hits[text] = self.store.retrieve(text, k=self.memory_k, retrieval=self.retrieval) \
                if self.store is not None else []
        return self._hits[text]

    def _prefixed(self, prefix: list[int], query: list[int]) -> torch.Tensor:
        """Last-token logits of ``prefix + query``, the prefix's K-V computed once and reused."""
        ml = self.ml
        key = len(prefix)
        if key not in self._cache:
            self._cache[key] = ml.run(prefix, capture=True, logits_for=None).kv
        ctx, pos = ml.context(None, self._cache[key])
        return ml.run(query, positions=torch.arange(len(query)) + pos, context=ctx, logits_for=slice(-1, None)).logits

    def score(self, condition: str, text: str) -> tuple[list[float], int, int]:
        """Label logits, prompt tokens encoded and memory tokens attended for one test sentence."""
        ml = self.ml
        query = self._ids(demo_text(self.task.field, text, None))
        memory_tokens = 0
        with torch.no_grad():
            if condition in ("zero_shot", "prompt"):
                prefix = self.head + (self.shots if condition == "prompt" else [])
                logits, n = self._prefixed(prefix, query), len(prefix) + len(query)
            elif condition == "prompt+memory":
                ids = self.head + self.shots + query
                memory = ml.memory_for(self.hits(text), self.store.namespace) if self.store else None
                memory_tokens = 0 if memory is None else memory[0].shape[2]
                logits, n = ml.run(ids, memory=memory, logits_for=slice(-1, None)).logits, len(ids)
            elif condition == "prompt+retrieved_text":
                chosen = self.hits(text)
                pasted = [t for cid in chosen for t in self._ids(self.store.text([cid]))] if chosen else []
                ids = pasted + self.head + self.shots + query
                logits, n = ml.run(ids, logits_for=slice(-1, None)).logits, len(ids)
            else:
                raise ValueError(f"Unknown ICL condition {condition!r}.")
        return logits[0, -1, self.label_ids].float().tolist(), n, memory_tokens

    def run(self, condition: str, test: Sequence[tuple[str, str]], *, progress: bool = False,
            desc: str = "") -> dict[str, Any]:
        """``{"correct", "outcomes" (1/0 per sentence), "prompt_tokens", "memory_tokens" (means per query)}``."""
        from tqdm.auto import tqdm

        outcomes = []
        tokens = memory = 0
        for text, gold in tqdm(test, desc=desc, disable=not progress):
            scores, n, m = self.score(condition, text)
            outcomes.append(int(self.labels[max(range(len(scores)), key=scores.__getitem__)] == gold))
            tokens += n
            memory += m
        return {"correct": sum(outcomes), "outcomes": outcomes, "prompt_tokens": tokens / len(test),
                "memory_tokens": memory / len(test)}
