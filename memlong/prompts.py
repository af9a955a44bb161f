"""Prompt layouts: how a conversation becomes the text MemLong encodes after the retrieved memory.

One module for the layouts the CLI demo and the framework adapters use, so that all of them put the same
text at the same positions. A *turn* is ``(role, text)`` with role ``"system"``, ``"user"`` or ``"assistant"``.

* :func:`plain_prompt` - the continuation layout ``\\nQuestion: ...\\nAnswer:``. Retrieved chunks' K-V sit right
  before the prompt, so the document flows straight into the question (a chat header between them confuses
  small models); answers end at :data:`PLAIN_STOP`. The CLI demo, LangChain's plain mode and the LlamaIndex
  query engine's default template are this layout.
* :func:`role_prompt` - ``\\nUser: ...\\nAssistant:``, for chat models without a chat template.
* :func:`chat_prompt` - the tokenizer's own chat template (``apply_chat_template``).

Examples (doctests, run by tests/test_prompts.py):
    >>> plain_prompt([("user", "Who killed Polonius?")])
    '\\nQuestion: Who killed Polonius?\\nAnswer:'
    >>> question_prompt("Who killed Polonius?") == plain_prompt([("user", "Who killed Polonius?")])
    True
    >>> plain_prompt([("system", "Be brief."), ("user", "Who?"), ("assistant", "Hamlet."), ("user", "Why?")],
    ...              after_memory=False)
    'Be brief.\\nQuestion: Who?\\nAnswer: Hamlet.\\nQuestion: Why?\\nAnswer:'
    >>> role_prompt([("user", "Hi"), ("assistant", "Hello."), ("user", "Who is Hamlet?")])
    '\\nUser: Hi\\nAssistant: Hello.\\nUser: Who is Hamlet?\\nAssistant:'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["PLAIN_STOP", "ROLES", "ROLE_STOP", "Turn", "chat_prompt", "plain_prompt", "question_prompt", "role_prompt"]

Turn = tuple[str, str]  # (role, text); role: "system", "user" or "assistant"
ROLES = ("system", "user", "assistant")
PLAIN_STOP = ("\nQuestion:", "\n\n")  # a plain-layout answer ends at the next question or paragraph
ROLE_STOP = ("\nUser:", "\nSystem:")  # a role-layout answer ends where the model writes the next turn itself


def _check(turns: Sequence[Turn]) -> None:
    bad = sorted({role for role, _ in turns if role not in ROLES})
    if bad:
        raise ValueError(f"Unknown role(s) {bad} in the turns; use one of {list(ROLES)}.")


def plain_prompt(turns: Sequence[Turn], *, after_memory: bool = True) -> str:
    """Continuation layout: ``\\n<system>\\nQuestion: <user>\\nAnswer: <assistant>\\n...Question: <last>\\nAnswer:``.

    Args:
        turns: the conversation; a system turn's text stands on its own line.
        after_memory: start with a newline, so that the prompt reads on from the retrieved chunks whose K-V sit
            right before it. Without memory, start with the first line: text pasted into a system turn then takes
            the place retrieved K-V would take (right after the sink), so both layouts put the context at the
            same positions.

    Raises:
        ValueError: an unknown role.
    """
    _check(turns)
    lines = [""] if after_memory else []
    for role, text in turns:
        if role == "system":
            lines.append(text)
        elif role == "user":
            lines.append(f"Question: {text}")
        else:
            lines.append(f"Answer: {text}")
    if turns and turns[-1][0] == "assistant":
        lines.append("Question:")  # the last turn was the model's: nothing asked yet
    return "\n".join(lines) + "\nAnswer:"


def question_prompt(question: str) -> str:
    """One question in the plain layout, read on from memory: ``\\nQuestion: <question>\\nAnswer:``."""
    return plain_prompt([("user", question)])


def role_prompt(turns: Sequence[Turn]) -> str:
    """Role-labelled layout for chat without a template: ``\\nUser: ...\\nAssistant: ...\\nAssistant:``; answers
    end at :data:`ROLE_STOP` (a small model goes on to write the next turns itself).

    Raises:
        ValueError: an unknown role.
    """
    _check(turns)
    return "".join(f"\n{role.capitalize()}: {text}" for role, text in turns) + "\nAssistant:"


def chat_prompt(tokenizer: Any, turns: Sequence[Turn]) -> str:
    """The tokenizer's chat template over ``turns``, ending with the assistant's generation prompt.

    Raises:
        ValueError: an unknown role, or a tokenizer without a chat template.
    """
    _check(turns)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("This tokenizer has no chat template: use a plain prompt (ChatMemLong(prompt_format='plain'), "
                         "or memlong.prompts.plain_prompt() / role_prompt()).")
    return tokenizer.apply_chat_template([{"role": r, "content": t} for r, t in turns], tokenize=False,
                                         add_generation_prompt=True)
