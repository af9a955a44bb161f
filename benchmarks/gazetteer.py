"""A second corpus for the K-V fidelity benchmark: a gazetteer of invented islands (not Shakespeare, not the
``planted_fact_documents`` template).

Every island gets one entry of plain descriptive prose (weather, trade, history sentences drawn from a pool)
in which four facts are stated in running text, each in its own paragraph and in its own wording. Questions
use another form than the planted-fact ones (``Q: ... / A: <prefix>``) and ask for one fact per island.

Example:
    >>> docs, questions = gazetteer(4)
    >>> questions[0].question
    'Q: Who is the harbourmaster of Varnholm?'
    >>> questions[0].tail
    '\\nQ: Who is the harbourmaster of Varnholm?\\nA: The harbourmaster of Varnholm is'
    >>> questions[0].correct(" Ilse Dorn, who keeps the ledger.")
    True
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["GazetteerQuestion", "gazetteer"]

ISLANDS = ["Varnholm", "Kestrel Rock", "Oleander Cay", "Brannoch", "Sellis", "Tamberlay", "Quillon", "Fennick Isle",
           "Morrow Sound", "Alcastre", "Hollin", "Drevenna", "Isk", "Pallow", "Wyndmere", "Corran Skerry",
           "Ebberly", "Saltmarch", "Tirrane", "Lunder", "Gaskell Reef", "Ormsby", "Pellucid", "Yarrowdown"]
HARBOURMASTERS = ["Ilse Dorn", "Piet Alvar", "Marta Okonkwo", "Sven Raleigh", "Nadia Ferrante", "Owen Castell",
                  "Greta Lindqvist", "Tomas Iriarte", "Ada Pemberton", "Jonah Keel", "Rhea Sandoval", "Emil Vasko",
                  "Lotte Brandt", "Casimir Hoyle", "Vera Mallory", "Anselm Grieve", "Dagny Thorne", "Felix Amaro",
                  "Ingrid Solis", "Hugo Tennant", "Mira Castellan", "Bram Oduya", "Selma Varga", "Leon Achterberg"]
EXPORTS = ["smoked eel", "blue slate", "kelp ash", "goose down", "amber beads", "dried cod", "rope fibre",
           "sea lavender oil", "whetstones", "salted capers", "felted wool", "pearl buttons", "tar", "cider",
           "oyster shell lime", "peat bricks", "juniper gin", "driftwood carvings", "sheep cheese", "sponges",
           "copper wire", "hemp sailcloth", "beeswax candles", "pickled samphire"]
FESTIVALS = ["the Lantern Walk", "the Herring Moon", "the Feast of Nets", "the Gull Regatta", "the Bonfire Tide",
             "the Kelp Crowning", "the Bell Night", "the Driftwood Fair", "the Salt Wedding", "the Storm Vigil",
             "the Oyster Dance", "the Beacon Race", "the Tar Barrel Run", "the Whale Hymn", "the Mast Raising",
             "the Rope Parade", "the Lamb Market", "the Ferry Blessing", "the Puffin Count", "the Cider Wake",
             "the Star Supper", "the Tidewalk", "the Harbour Ball", "the Frost Muster"]
ANIMALS = ["grey seals", "puffins", "red deer", "otters", "gannets", "wild ponies", "hares", "ospreys", "minke whales",
           "eider ducks", "adders", "pine martens", "terns", "basking sharks", "curlews", "feral goats", "shags",
           "dolphins", "badgers", "skuas", "kittiwakes", "stoats", "porpoises", "oystercatchers"]

FILLER = [
    "The coast road of {i} follows the cliffs for most of its length and is closed in winter gales.",
    "Most houses on {i} are built of grey stone, with low roofs that keep the wind off the thatch.",
    "A ferry from the mainland calls at {i} twice a week in summer and once a fortnight in winter.",
    "Rain falls on {i} on more than two hundred days of the year, yet the south slopes stay dry enough for barley.",
    "The island school of {i} teaches children of every age in a single room beside the chapel.",
    "Fishing boats leave {i} before dawn and return with the tide in the early afternoon.",
    "Visitors to {i} are warned that the tidal channel on the east side can rise faster than a person can walk.",
    "The old watchtower on {i} was rebuilt twice after storms and now serves as a weather station.",
    "Peat is still cut on the moor of {i}, although most homes now burn coal brought by the ferry.",
    "There is one shop on {i}; it sells bread, paraffin, rope and newspapers that are always a day late.",
    "In the spring the meadows of {i} turn white with sea campion and yellow with primroses.",
    "The people of {i} speak a dialect in which the words for wind outnumber the words for sun.",
    "A wooden pier on the north shore of {i} is used by yachts in the calm weeks of late summer.",
    "The chapel bell of {i} was cast from the brass fittings of a ship that ran aground there long ago.",
    "Sheep graze the common land of {i}, and each family marks its flock with a coloured stripe.",
    "Fog settles over {i} most mornings in autumn and lifts only when the tide turns.",
    "The graveyard of {i} holds the stones of sailors from a dozen countries.",
    "Water on {i} comes from a spring high on the hill and is carried down in clay pipes.",
    "Walkers can circle {i} in a long day, crossing three beaches and two stretches of bog.",
    "The council of {i} meets in the back room of the inn on the first Monday of each month.",
]
FACTS = {
    "harbourmaster": ("Every boat that wants a berth at {i} must first report to {v}, who has kept the harbour "
                      "ledger for many years.",
                      "Q: Who is the harbourmaster of {i}?", " The harbourmaster of {i} is"),
    "export": ("Most of the money that comes to {i} is earned by selling {v}, which leaves on every ferry.",
               "Q: What is the main export of {i}?", " The main export of {i} is"),
    "festival": ("Once a year the whole of {i} turns out for {v}, the island's great celebration.",
                 "Q: What festival is celebrated on {i}?", " The festival celebrated on {i} is"),
    "animal": ("Naturalists come to {i} mainly to watch the {v}, which are found there in great numbers.",
               "Q: Which animals do naturalists come to {i} to watch?", " Naturalists come to {i} to watch the"),
}
VALUES = {"harbourmaster": HARBOURMASTERS, "export": EXPORTS, "festival": FESTIVALS, "animal": ANIMALS}


@dataclass(frozen=True)
class GazetteerQuestion:
    """One question about one island; ``correct(text)`` checks an answer (its value's first word, case-blind)."""

    document: int
    question: str
    answer_prefix: str
    answer: str

    @property
    def tail(self) -> str:
        """The prompt after the retrieved chunks: ``"\\nQ: ...\\nA: <answer prefix>"``."""
        return f"\n{self.question}\nA:{self.answer_prefix}"

    def correct(self, text: str) -> bool:
        first = self.answer.split()[1] if self.answer.startswith("the ") else self.answer.split()[0]
        return first.lower() in text.lower()


def gazetteer(n_islands: int = 24, *, paragraphs: int = 6, seed: int = 0) -> tuple[list[str], list[GazetteerQuestion]]:
    """``n_islands`` (<= 24) entries of about 500 tokens each (``paragraphs`` of three sentences plus the
    facts) and one question per island (attributes cycle).

    Deterministic for a given ``seed``. Returns ``(documents, questions)``.
    """
    if not 0 < n_islands <= len(ISLANDS):
        raise ValueError(f"n_islands must be in 1..{len(ISLANDS)}, got {n_islands}.")
    if not len(FACTS) <= paragraphs <= len(FILLER) // 3:
        raise ValueError(f"paragraphs must be in {len(FACTS)}..{len(FILLER) // 3}, got {paragraphs}.")
    rng = random.Random(seed)
    docs, questions = [], []
    attributes = list(FACTS)
    for d, island in enumerate(ISLANDS[:n_islands]):
        values = {a: VALUES[a][d] for a in attributes}
        fact_paragraph = dict(zip(attributes, rng.sample(range(paragraphs), len(attributes)), strict=True))
        filler = [s.format(i=island) for s in rng.sample(FILLER, 3 * paragraphs)]  # no sentence twice
        paras = []
        for p in range(paragraphs):
            sentences = filler[3 * p: 3 * p + 3]
            for a, where in fact_paragraph.items():
                if where == p:
                    sentences.insert(rng.randrange(len(sentences) + 1), FACTS[a][0].format(i=island, v=values[a]))
            paras.append(" ".join(sentences))
        docs.append(f"{island}\n\n" + "\n\n".join(paras) + "\n")
        asked = attributes[d % len(attributes)]
        _, question, prefix = FACTS[asked]
        questions.append(GazetteerQuestion(document=d, question=question.format(i=island),
                                           answer_prefix=prefix.format(i=island), answer=values[asked]))
    return docs, questions


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Print the invented-island corpus that benchmarks/kv_fidelity.py "
                                                 "--corpus gazetteer reads (an entry and its question per island). "
                                                 "It is a module; this only shows what it makes.")
    parser.add_argument("--islands", type=int, default=2, help="entries to print, 1..24 (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="the corpus's seed (default 0, what the benchmark uses)")
    args = parser.parse_args()
    try:
        documents, asked = gazetteer(args.islands, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))
    for document, question in zip(documents, asked, strict=True):
        print(document + question.tail + f" [{question.answer}]\n")
