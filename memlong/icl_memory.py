"""Demonstrations in memory: how they are stored and how they are retrieved for a test sentence.

Storage (``storage=``):

* ``"demo"`` (default) — one demonstration per chunk, its K-V computed from the demonstration alone after the
  sink (chunk context: what pasting it at the start of a prompt computes), retrieved by the embedding of its
  sentence (without the label);
* ``"aligned"`` — one demonstration per chunk, but K-V computed in the stream of all demonstrations (each
  demonstration sees the ones before it in the local window: document context), retrieved by its text;
* ``"stream"`` — the demonstrations as one text ingested with :meth:`MemLong.ingest` (128-token chunks that cut
  demonstrations anywhere, document context): the original layout.

Retrieval (``retrieval=``): ``"similar"`` — the ``k`` chunks nearest the test sentence; ``"balanced"`` — the
nearest ``k / n_labels`` of every label (``demo`` and ``aligned`` only, whose chunks each carry one label).

Example:
    >>> store = store_demos(ml, demos, field="Review", namespace="_icl", storage="demo")
    >>> hits = store.retrieve("a tender, funny film", k=16, retrieval="similar")
    >>> memory = ml.memory_for(hits, "_icl"); pasted = store.text(hits)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from memlong.choices import RETRIEVALS, STORAGES
from memlong.model import MemLong

__all__ = ["RETRIEVALS", "STORAGES", "DemoStore", "demo_text", "store_demos"]



def demo_text(field_name: str, text: str, label: str | None) -> str:
    """One demonstration (``label`` given) or the query block (``label=None``) of the prompt."""
    return f"{field_name}: {text}\nAnswer: {label}\n\n" if label is not None else f"{field_name}: {text}\nAnswer:"


@dataclass
class DemoStore:
    """The demonstrations of one namespace: chunk ids in document order and, per chunk, its label (or ``None``
    when a chunk holds parts of several demonstrations)."""

    ml: MemLong
    namespace: str
    storage: str
    chunk_ids: list[str] = field(default_factory=list)
    labels: dict[str, str | None] = field(default_factory=dict)

    def retrieve(self, query: str | np.ndarray, *, k: int, retrieval: str = "similar") -> list[str]:
        """Ids of the chunks to attend to for ``query`` (text or its embedding), in document order."""
        if k <= 0 or not self.chunk_ids:
            return []
        bank = self.ml.bank
        if retrieval == "similar":
            hits = bank.search(query, namespace=self.namespace, k=k, mode="dense")
            chosen = [h.chunk_id for h in hits]
        elif retrieval == "balanced":
            if self.storage == "stream":
                raise ValueError("retrieval='balanced' needs one label per chunk: use storage='demo' or 'aligned'.")
            ranked = [h.chunk_id for h in bank.search(query, namespace=self.namespace, k=len(self.chunk_ids),
                                                      mode="dense")]
            names = sorted({lab for lab in self.labels.values() if lab is not None})
            quota = {lab: k // len(names) + (1 if i < k % len(names) else 0) for i, lab in enumerate(names)}
            chosen = []
            for cid in ranked:
                lab = self.labels[cid]
                if quota.get(lab, 0) > 0:
                    quota[lab] -= 1
                    chosen.append(cid)
        else:
            raise ValueError(f"Unknown retrieval {retrieval!r}; choose one of {list(RETRIEVALS)}.")
        order = {cid: i for i, cid in enumerate(self.chunk_ids)}
        return sorted(chosen, key=order.__getitem__)

    def text(self, chunk_ids: Sequence[str]) -> str:
        """The chunks' texts joined in document order: the same demonstrations, pasted as text."""
        order = {cid: i for i, cid in enumerate(self.chunk_ids)}
        return "".join(self.ml.bank.get(cid, namespace=self.namespace).text
                       for cid in sorted(chunk_ids, key=order.__getitem__))


def _kv_alone(ml: MemLong, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-RoPE K-V of ``ids`` read alone after the sink, stacked over the source layers: ``(L_src, Hkv, T, D)``."""
    with torch.no_grad():
        kv = ml.run(ids, capture=True, logits_for=None).kv
    layers = ml.config.source_layers
    return (torch.stack([kv[layer][0][0] for layer in layers]), torch.stack([kv[layer][1][0] for layer in layers]))


def _check_capacity(ml: MemLong, tokens: int) -> None:
    if tokens > ml.bank.capacity:
        raise ValueError(f"The memory demonstrations take {tokens} tokens but memory_capacity is {ml.bank.capacity}; "
                         "raise memory_capacity (MemLong.from_pretrained(..., memory_capacity=N), CLI "
                         "--memory-capacity) or lower memory_demos.")


def store_demos(ml: MemLong, demos: Sequence[tuple[str, str]], *, field: str, namespace: str,
                storage: str = "demo", head: str = "") -> DemoStore:
    """Write ``demos`` (``(text, label word)``) into the empty ``namespace`` as ``storage`` says (module doc).

    ``head`` (the instruction) starts the ``stream`` layout's text, as in a prompt; the other layouts store
    demonstrations only.
    """
    if storage not in STORAGES:
        raise ValueError(f"Unknown demonstration storage {storage!r}; choose one of {list(STORAGES)}.")
    store = DemoStore(ml, namespace, storage)
    if not demos:
        return store
    texts = [demo_text(field, t, lab) for t, lab in demos]
    if storage == "stream":
        ml.ingest(head + "".join(texts), namespace=namespace, doc_ids=["icl-demos"], progress=False)
        store.chunk_ids = ml.bank.chunk_ids(namespace)
        store.labels = dict.fromkeys(store.chunk_ids)
        return store
    encoded = [ml.strip_sink(ml.tokenize(t)) for t in texts]
    _check_capacity(ml, sum(map(len, encoded)))
    if storage == "demo":
        kvs = [_kv_alone(ml, ids) for ids in encoded]
        embeddings = ml.bank.embedder.encode([t for t, _ in demos])  # the sentence, not its label
        spans, start = [], 0
        for ids in encoded:
            spans.append((start, start + len(ids)))
            start += len(ids)
        ids_ = ml.bank.add_chunks(texts, keys=[k for k, _ in kvs], values=[v for _, v in kvs], namespace=namespace,
                                  doc_id="icl-demos", spans=spans, embeddings=embeddings, tokens=encoded, atomic=True)
    else:  # aligned: each demonstration one stream step, so one chunk, in the window of the ones before it
        stream = ml.stream(namespace, doc_id="icl-demos")
        start = 0
        with torch.no_grad():
            for ids in encoded:
                stream.step(ids, k=0, span=(start, start + len(ids)))
                start += len(ids)
        stream.flush()
        ids_ = list(stream.chunk_ids)
    if len(ids_) != len(demos):
        raise RuntimeError(f"Stored {len(ids_)} chunks for {len(demos)} demonstrations.")
    store.chunk_ids = ids_
    store.labels = {cid: lab for cid, (_, lab) in zip(ids_, demos)}
    return store
