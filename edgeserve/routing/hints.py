"""Prompt shaping for a decision: the style instruction, the budget hint, answer forcing. Pure text.

Where the text goes: the LAST message whose role is ``user`` gets, after its own content, a blank
line, the style instruction, a newline and the hint::

    {content}\\n\\n{style instruction}\\n{hint}

e.g. with style ``boxed`` and 128 hint tokens::

    What is 17 * 3?

    Please reason step by step, and put your final answer within \\boxed{}.
    You MUST respond in **UNDER 128 tokens**

A part that is switched off (no style, no hint) is left out together with its separator. With no
user message at all, the text becomes a new user message at the end. Nothing else is touched, so
system prompts and earlier turns reach the chat template exactly as the client sent them.
"""

from __future__ import annotations

import math

from edgeserve.routing.policy_file import BUILTIN_STYLES, PolicyFile


class UnknownStyleError(ValueError):
    """A request asked for a prompt style the policy does not define."""


def hint_tokens_for(max_tokens: int, policy: PolicyFile) -> int:
    """The n of the hint: floor(ratio × max_tokens), at least 1 (as in the study, ratio 0.5)."""
    return max(1, math.floor(policy.hint.ratio * max_tokens))


def hint_text(hint_tokens: int, policy: PolicyFile) -> str:
    """The hint sentence, e.g. ``You MUST respond in **UNDER 128 tokens**``."""
    return policy.hint.template.format(n=hint_tokens)


def style_instruction(style: str, policy: PolicyFile) -> str:
    """The instruction text of a style (the policy's, else the built-in one)."""
    config = policy.styles.get(style) or BUILTIN_STYLES.get(style)
    if config is None:
        known = sorted({*policy.styles, *BUILTIN_STYLES})
        raise UnknownStyleError(f"unknown prompt style '{style}'; known styles: {known}")
    return config.instruction


def prompt_suffix(style: str | None, hint_tokens: int | None, policy: PolicyFile) -> str:
    """The text appended to the last user message (without the leading blank line)."""
    parts = []
    if style is not None:
        parts.append(style_instruction(style, policy))
    if hint_tokens is not None:
        parts.append(hint_text(hint_tokens, policy))
    return "\n".join(parts)


def apply_style_and_hint(
    messages: list[dict[str, str]],
    style: str | None,
    hint_tokens: int | None,
    policy: PolicyFile,
) -> list[dict[str, str]]:
    """A copy of ``messages`` with the style instruction and the hint added (see module doc).

    ``style=None`` adds no instruction, ``hint_tokens=None`` no hint; with neither, the messages
    come back unchanged (as a copy). The input list and its dicts are never modified.
    """
    suffix = prompt_suffix(style, hint_tokens, policy)
    shaped = [dict(message) for message in messages]
    if not suffix:
        return shaped
    for message in reversed(shaped):
        if message.get("role") == "user":
            content = message.get("content") or ""
            message["content"] = f"{content}\n\n{suffix}" if content else suffix
            return shaped
    shaped.append({"role": "user", "content": suffix})
    return shaped


# ---- answer forcing -------------------------------------------------------------------------


def has_final_answer(text: str) -> bool:
    """Whether generated text already holds a final answer (a ``\\boxed{`` was opened)."""
    return "\\boxed{" in text


def should_force_answer(text_so_far: str, tokens_left: int, policy: PolicyFile) -> bool:
    """True once the remaining budget is down to the policy's reserve and no answer has appeared:
    the runner should then append ``policy.answer_forcing.prefix`` and let the model close it."""
    forcing = policy.answer_forcing
    return (
        forcing.enabled
        and 0 < tokens_left <= forcing.reserve_tokens
        and not has_final_answer(text_so_far)
    )
