"""The one prompt-layout module: its doctests, and that it reproduces the layouts the CLI and adapters use today."""

import doctest

import pytest

import memlong.prompts
from memlong.prompts import PLAIN_STOP, chat_prompt, plain_prompt, question_prompt, role_prompt

TURNS = [("system", "Context: the play."), ("user", "Who is Hamlet?"), ("assistant", "A prince."), ("user", "Where?")]


def test_doctests():
    assert doctest.testmod(memlong.prompts).failed == 0


def test_the_cli_and_both_adapters_render_with_this_module():
    from memlong import demo
    from memlong_integrations import _answer
    from memlong_integrations.langchain import chat_models
    from memlong_integrations.llama_index import llm, query_engine

    assert chat_models.plain_prompt is plain_prompt and chat_models.chat_prompt is chat_prompt
    assert llm.role_prompt is role_prompt and llm.chat_prompt is chat_prompt
    assert demo.question_prompt is question_prompt
    assert _answer.PLAIN_STOP is PLAIN_STOP and query_engine.PLAIN_STOP is PLAIN_STOP
    assert query_engine.DEFAULT_KV_PROMPT.format(query_str="Who is Hamlet?") == \
        question_prompt("Who is Hamlet?") + " " + _answer.KV_ANSWER_PREFIX


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
