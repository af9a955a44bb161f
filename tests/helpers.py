"""Small helpers shared by test files (imported as ``helpers``: pytest puts ``tests/`` on the path)."""

import threading

import pytest
import torch

# A text whose chunks are distinct lines: any two retrieved out of order give different logits than pasted in order.
SHIP_TEXT = " ".join(f"Line {i}: the {['red', 'blue', 'green'][i % 3]} ship sails to port {i * 7 % 11}." for i in range(120))


def stop_across_pieces(pieces: list[str]) -> tuple[str, str]:
    """A 4-character stop string made of the last 2 characters of one streamed piece and the first 2 of the next,
    and the answer expected with it (the text before it, right-stripped). Skips when no such stop exists."""
    full = "".join(pieces)
    for k in range(1, len(pieces)):
        at = len("".join(pieces[:k]))
        stop = full[at - 2:at + 2]
        if len(stop) == 4 and full.find(stop) == at - 2 and full[:at - 2].strip():
            return stop, full[:at - 2].rstrip()
    pytest.skip("the tiny model's pieces are too short to build a stop across two of them")


def three_chunks_pasted(ml, reference):
    """Ingest ``SHIP_TEXT`` as chunk-context memory and pick three chunks out of order; returns ``(picked ids,
    their tokens in document order, prompt ids, the stock model's logits of the prompt after sink + those tokens
    pasted)``: what reading the chunks' K-V must reproduce when every retrieved token is re-encoded."""
    stats = ml.ingest(SHIP_TEXT, namespace="doc", context="chunk", progress=False)
    picked = [stats.chunk_ids[i] for i in (5, 0, 3)]
    tokens = [t for i in (0, 3, 5) for t in ml.bank.get(stats.chunk_ids[i], namespace="doc").tokens]
    prompt = ml.tokenize(" Where does the red ship sail?")
    with torch.no_grad():
        expected = reference(torch.tensor([ml.sink_ids + tokens + prompt])).logits[0, -len(prompt):]
    return picked, tokens, prompt, expected


def meanwhile(target) -> threading.Thread:
    """Run ``target`` in another thread and give it 0.5 s: it finishes unless the caller holds the bank still
    (``bank.reading()``), as a write from another thread does between two reads of the caller."""
    t = threading.Thread(target=target)
    t.start()
    t.join(0.5)
    return t


def named_by_manifest(path) -> set[str]:
    """The files a bank directory's manifest names: its record and tensors, its segments and its journal's deltas."""
    import json
    from pathlib import Path

    manifest = json.loads((Path(path) / "manifest.json").read_text())
    deltas = [d[k] for d in manifest.get("journal", []) for k in ("record", "tensors")]
    return {e["name"] for e in manifest["files"] + manifest.get("segments", []) + deltas}


def rewrite_saved(path, index: int, data: bytes) -> None:
    """Replace file ``index`` of the bank at ``path`` (0: its record, 1: its tensors) with ``data`` and fix its size
    and sha256 in the manifest: content a loader must judge on its own, past the checksums."""
    import hashlib
    import json
    from pathlib import Path

    manifest_file = Path(path) / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    entry = manifest["files"][index]
    (Path(path) / entry["name"]).write_bytes(data)
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest_file.write_text(json.dumps(manifest))
