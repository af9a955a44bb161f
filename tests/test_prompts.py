"""The one prompt-layout module: its doctests, and that it reproduces the layouts the CLI and adapters use today."""

import doctest

import pytest

import memlong.prompts
from memlong.prompts import PLAIN_STOP, chat_prompt, plain_prompt, question_prompt, role_prompt

TURNS = [("system", "Context: the play."), ("user", "Who is Hamlet?"), ("assistant", "A prince."), ("user", "Where?")]


def test_doctests():
    assert doctest.testmod(memlong.prompts).failed == 0


def test_plain_layout_matches_langchain_and_llama_index_defaults():
    chat_models = pytest.importorskip("memlong_integrations.langchain.chat_models")
    render = getattr(chat_models, "_render_plain", None)
    if render is None:
        pytest.skip("the LangChain adapter renders with memlong.prompts now")
    for after in (True, False):
        assert plain_prompt(TURNS, after_memory=after) == render(TURNS, after_memory=after)
        assert plain_prompt(TURNS[:3], after_memory=after) == render(TURNS[:3], after_memory=after)
    assert PLAIN_STOP == chat_models.PLAIN_STOP
    query_engine = pytest.importorskip("memlong_integrations.llama_index.query_engine")
    assert query_engine.DEFAULT_KV_PROMPT.format(query_str="Who is Hamlet?") == question_prompt("Who is Hamlet?")


def test_role_and_chat_layouts(tokenizer):
    turns = [("user", "Who is Hamlet?"), ("assistant", "A prince."), ("user", "Where?")]
    assert role_prompt(turns) == "\nUser: Who is Hamlet?\nAssistant: A prince.\nUser: Where?\nAssistant:"
    text = chat_prompt(tokenizer, turns)
    assert text == tokenizer.apply_chat_template([{"role": r, "content": t} for r, t in turns], tokenize=False,
                                                 add_generation_prompt=True)
    assert text.index("Who is Hamlet?") < text.index("A prince.") < text.index("Where?")
    assert text.rstrip().endswith("assistant")  # SmolLM2's template opens the assistant's turn


@pytest.mark.parametrize("render", [plain_prompt, role_prompt])
def test_unknown_roles_are_refused(render):
    with pytest.raises(ValueError, match="Unknown role"):
        render([("human", "hi")])


def test_chat_prompt_needs_a_template():
    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="no chat template"):
        chat_prompt(NoTemplate(), [("user", "hi")])
