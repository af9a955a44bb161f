"""``memlong ask``: your own text files into memory, your questions answered from it.

    memlong ask --file book.txt "Who keeps the abbey bell?"
    memlong ask --file book.txt --memory book.memory "Who keeps the abbey bell?"   # ingested once, reopened after
    memlong ask --memory book.memory "What did the letter say?" "Who wrote it?"     # no file read at all

Each file is one document; its doc id is its absolute path, and every chunk carries ``{"file", "sha256"}`` in
its metadata. Without ``--memory`` the memory lives for the run. With ``--memory DIR`` it is a disk bank at
``DIR`` (``MemLong.from_pretrained(memory_path=DIR)``, created or reopened): a file whose content (sha256) is
already there is not read again, a changed file replaces its old chunks, and the bank is committed once all
files are in (an interrupted run leaves the last commit). Each answer streams to standard output, then its
sources: the file and the first words of each retrieved chunk, best first.

The question's layout (:data:`LAYOUTS`, :mod:`memlong.prompts`): ``"role"`` (``User: ... / Assistant:``, the
default), ``"chat"`` (the tokenizer's chat template) or ``"plain"`` (``Question: ... / Answer:``, the demo's,
which forces the answer's first words; here nothing is forced). On the default 135M model, 12 planted facts asked
with no forced words: role 6 right, chat 5, plain 3 (``benchmarks/ask_layouts.py``, docs/cli.md).

Example:
    >>> ml = MemLong.from_pretrained("default", top_k=4)
    >>> add_files(ml, {"book.txt": open("book.txt").read()}, namespace="default")
    >>> ask(ml, "Who keeps the abbey bell?", namespace="default")["answer"]
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from memlong.choices import ASK_LAYOUTS
from memlong.generation import PromptTooLongError
from memlong.model import MemLong
from memlong.prompts import PLAIN_STOP, ROLE_STOP, question_prompt, role_prompt

__all__ = ["LAYOUTS", "add_files", "ask", "held_files", "prompt_for", "run_ask"]

LAYOUTS = ASK_LAYOUTS


def prompt_for(question: str, layout: str = "role") -> tuple[str, tuple[str, ...], bool]:
    """``(prompt, stop strings, chat)`` for ``question`` in ``layout`` (one of :data:`LAYOUTS`). :func:`ask` also
    ends an answer at its first blank line (a 135M model goes on with the next speech of the play).

    Example:
        >>> prompt_for("Who keeps the abbey bell?")
        ('\\nUser: Who keeps the abbey bell?\\nAssistant:', ('\\nUser:', '\\nSystem:'), False)
    """
    if layout == "role":
        return role_prompt([("user", question)]), ROLE_STOP, False
    if layout == "chat":
        return question, (), True
    if layout == "plain":
        return question_prompt(question), tuple(s for s in PLAIN_STOP if s.strip()), False  # (blank lines: ask)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")


def add_files(ml: MemLong, files: Mapping[str, str], *, namespace: str, progress: bool = True) -> list[dict[str, Any]]:
    """Ingest ``files`` (path -> text) into ``namespace``, each under its absolute path as doc id. A file whose text
    (sha256) the namespace already holds, under this path or another (a moved file), is skipped; a changed one is
    replaced. Returns one record per file: ``{"file", "tokens", "chunks", "ingested", "seconds"}`` (``tokens``:
    those ingested, 0 when skipped; ``chunks``: the document's)."""
    held = {}  # sha256 -> (doc id, chunk ids) of the document holding that text
    for doc, ids in ml.bank.doc_chunk_ids(namespace).items():
        held.setdefault(ml.bank.get(ids[0], namespace=namespace).metadata.get("sha256"), (doc, ids))
    records = []
    for path, text in files.items():
        doc_id, digest = str(Path(path).expanduser().resolve()), hashlib.sha256(text.encode()).hexdigest()
        if held.get(digest, (doc_id,))[0] != doc_id:  # its text is there under another path: what this path held
            ml.bank.delete(doc_id=doc_id, namespace=namespace)  # before is not its text any more
        if digest in held:
            records.append({"file": path, "tokens": 0, "chunks": len(held[digest][1]), "ingested": False,
                            "seconds": 0.0})
            continue
        ml.bank.delete(doc_id=doc_id, namespace=namespace)  # a changed file's old text goes (on a disk bank: at the
        # commit, with the new text in; an interrupted run leaves the last commit)
        stats = ml.ingest(text, namespace=namespace, doc_ids=[doc_id], progress=progress,
                          metadatas=[{"file": path, "sha256": digest}])
        held[digest] = (doc_id, stats.chunk_ids)
        records.append({"file": path, "tokens": stats.tokens, "chunks": len(stats.chunk_ids), "ingested": True,
                        "seconds": round(stats.seconds, 2)})
    return records


def ask(ml: MemLong, question: str, *, namespace: str, max_new_tokens: int = 64, layout: str = "role",
        echo: bool = False) -> dict[str, Any]:
    """Answer ``question`` from ``namespace``'s memory in ``layout`` (:func:`prompt_for`); with ``echo`` print it,
    the answer as it streams and its sources. Returns ``{"question", "answer", "layout", "sources",
    "prompt_tokens", "memory_tokens_attended", "time_to_first_token_s", "generate_s"}``; ``sources``:
    ``[{"file", "chunk_id", "span", "text"}]`` of the retrieved chunks, best first (``span``: token offsets in the
    file, ``text``: its first 80 characters). The answer starts at its first non-blank character and ends at a
    blank line after it (a leading line break does not end it)."""
    prompt, stop, chat = prompt_for(question, layout)
    if echo:
        print(f"\nQ: {question}\nA: ", end="", flush=True)
    generation = ml.generate(prompt, query=question, namespace=namespace, max_new_tokens=max_new_tokens, chat=chat,
                             stream=True, stop=stop)
    answer, shown = "", 0
    for piece in generation:
        answer = (answer + piece).lstrip()
        end = answer.find("\n\n")
        answer = answer if end < 0 else answer[:end]
        if echo:  # (trailing white space waits: the answer may end there)
            print(answer.rstrip()[shown:], end="", flush=True)
            shown = len(answer.rstrip())
        if end >= 0:
            generation.close()
            break
    stats, answer = generation.stats, answer.rstrip()
    chunks = [ml.bank.get(c, namespace=namespace) for c in stats.chunk_ids]
    texts = [" ".join(c.text.split()) for c in chunks]
    sources = [{"file": c.metadata.get("file", c.doc_id), "chunk_id": c.id, "span": list(c.span), "text": text[:80]}
               for c, text in zip(chunks, texts)]
    if echo:
        print(("" if answer else "(no answer)") + "\n   sources:" + ("" if sources else " none (nothing retrieved)"))
        print("\n".join(f"   [{n}] {s['file']}: {s['text']}{'...' if len(text) > 80 else ''}"
                        for n, (s, text) in enumerate(zip(sources, texts), 1)))
    return {"question": question, "answer": answer, "layout": layout, "sources": sources,
            "prompt_tokens": stats.prompt_tokens, "memory_tokens_attended": stats.memory_tokens,
            "time_to_first_token_s": round(stats.time_to_first_token, 3), "generate_s": round(stats.seconds, 2)}


def run_ask(ml: MemLong, files: Mapping[str, str], questions: Sequence[str], *, namespace: str = "default",
            max_new_tokens: int = 64, layout: str = "role", forget: Sequence[str] = (),
            progress: bool = True) -> list[dict[str, Any]]:
    """``memlong ask``'s run: check the questions fit the window, forget the files ``forget`` (paths, also of files
    deleted since), add ``files``, commit a disk bank, answer ``questions`` (printed as they stream). Returns one
    record per question, each with the run's ``files`` records and ``memory_chunks``."""
    t0 = time.perf_counter()
    for n, question in enumerate(questions, 1):  # before any ingest: a long question failed after it
        prompt, _, chat = prompt_for(question, layout)
        try:
            ml.encode_prompt(prompt, chat)
        except PromptTooLongError as exc:
            raise ValueError(f"QUESTION {n} is {exc.tokens} tokens with its layout, more than the local window of "
                             f"{exc.window}: shorten it, or raise --local-window.") from None
    for path in forget:
        doc_id = str(Path(path).expanduser().resolve())
        if not ml.bank.delete(doc_id=doc_id, namespace=namespace):
            raise ValueError(f"--forget {path!r}: no file {doc_id} in namespace {namespace!r}; it holds "
                             f"{', '.join(held_files(ml, namespace)) or 'nothing'}.")
        print(f"forgot {path}")
    added = add_files(ml, files, namespace=namespace, progress=progress)
    for record in added:
        done = f"{record['tokens']:,} tokens in {record['seconds']} s" if record["ingested"] else "already in memory"
        print(f"{record['file']}: {record['chunks']} chunks ({done})")
    if ml.bank.path is not None and (forget or any(r["ingested"] for r in added)):
        ml.bank.commit()
        print(f"committed the memory to {ml.bank.path}")
    held = ml.bank.num_chunks(namespace)
    if not held:
        others = ", ".join(repr(n) for n in ml.bank.namespaces())
        raise ValueError(f"The memory holds nothing in namespace {namespace!r} to answer from: give --file with a "
                         "text file" + (f", or a --namespace it holds ({others})" if others else "") + ".")
    names = held_files(ml, namespace)
    print(f"memory: {held} chunks of {len(names)} file(s) in namespace {namespace!r}: {', '.join(names[:10])}"
          f"{', ...' if len(names) > 10 else ''} ({time.perf_counter() - t0:.1f} s)")
    return [{**ask(ml, q, namespace=namespace, max_new_tokens=max_new_tokens, layout=layout, echo=True),
             "files": added, "memory_chunks": held} for q in questions]


def held_files(ml: MemLong, namespace: str) -> list[str]:
    """The files ``namespace`` holds (as first given), in the order they were added."""
    return [ml.bank.get(ids[0], namespace=namespace).metadata.get("file", doc)
            for doc, ids in ml.bank.doc_chunk_ids(namespace).items()]
