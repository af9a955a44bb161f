"""Text that is not ASCII: chunk texts give back the document, whatever characters a chunk boundary splits.

The default tokenizer is byte-level: a CJK character, an emoji or a Devanagari syllable can take several tokens,
and a chunk boundary can fall between them (found by a multilingual review: each chunk decoded alone turned the
character into U+FFFD in both chunks, and lost it from the text users retrieve, embed and paste)."""

import pytest

from memlong.streaming import chunk_texts

DOCUMENTS = {
    "chinese": "北京是中华人民共和国的首都，也是全国的政治、文化中心。" * 20,
    "emoji": "Family 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵, hearts ❤️‍🔥 " * 30,
    "hindi": "हिन्दी भारत की राजभाषा है। " * 40,
    "mixed": "Paris 巴黎 — مرحبا بالعالم — नमस्ते दुनिया — café ﬁne\r\n\tend " * 15,
}


@pytest.mark.parametrize("name", list(DOCUMENTS))
@pytest.mark.parametrize("context, strip", [("document", False), ("chunk", False), ("chunk", True)])
def test_chunk_texts_join_to_the_document(make_tiny, name, context, strip):
    ml, _ = make_tiny(chunk_size=16, local_window=128)
    doc = DOCUMENTS[name]
    ml.ingest(doc, namespace="t", progress=False, context=context, strip=strip)
    chunks = ml.bank.chunks("t")
    assert len(chunks) > 10
    assert not any("\ufffd" in c.text for c in chunks)
    if strip:  # each chunk's own text, stripped; its K-V's tokens are that text's (no U+FFFD bytes)
        assert all(ml.tokenizer.decode(list(c.tokens)) == c.text == c.text.strip() for c in chunks)
        assert all(c.text in doc for c in chunks)
    else:
        assert "".join(c.text for c in chunks) == doc
        assert ml.tokenizer.decode([t for c in chunks for t in c.tokens]) == doc


def test_a_split_character_belongs_to_the_chunk_that_completes_it(tokenizer):
    tokens = tokenizer("政治", add_special_tokens=False)["input_ids"]
    assert len(tokens) >= 3  # two characters, at least one of them in more than one token
    for cut in range(1, len(tokens)):
        texts = chunk_texts(tokenizer, [], tokens, [(0, cut), (cut, len(tokens))])
        assert "".join(texts) == "政治" and "\ufffd" not in "".join(texts)
    before = tokenizer("首都", add_special_tokens=False)["input_ids"]
    for cut in range(1, len(before)):  # the previous step's tail starts mid-character: it is not read
        assert chunk_texts(tokenizer, before[cut:], tokens, [(0, len(tokens))]) == ["政治"]
