from __future__ import annotations

import pytest

from edgeserve.routing.hints import (
    UnknownStyleError,
    apply_style_and_hint,
    hint_text,
    hint_tokens_for,
    should_force_answer,
)
from edgeserve.routing.policy_file import PolicyFile, parse_policy

POLICY = parse_policy(b'name = "p"\n[answer_forcing]\nenabled = true\nreserve_tokens = 24\n',
                      "p.toml")

CONVERSATION = [
    {"role": "system", "content": "You are a careful tutor."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! Ask me anything."},
    {"role": "user", "content": "What is 17 * 3?"},
]


def test_the_exact_text_the_model_receives_boxed() -> None:
    shaped = apply_style_and_hint(CONVERSATION, "boxed", hint_tokens_for(256, POLICY), POLICY)
    assert shaped[:3] == CONVERSATION[:3]
    assert shaped[3] == {
        "role": "user",
        "content": "What is 17 * 3?\n\n"
                   "Please reason step by step, and put your final answer within \\boxed{}.\n"
                   "You MUST respond in **UNDER 128 tokens**",
    }


def test_the_exact_text_the_model_receives_aav() -> None:
    shaped = apply_style_and_hint(CONVERSATION, "aav", 50, POLICY)
    assert shaped[-1]["content"] == (
        "What is 17 * 3?\n\n"
        "First give a quick answer. Then verify it step by step and correct it if needed. "
        "Put your final answer within \\boxed{}.\n"
        "You MUST respond in **UNDER 50 tokens**")


def test_parts_can_be_switched_off() -> None:
    assert apply_style_and_hint(CONVERSATION, None, 64, POLICY)[-1]["content"] == (
        "What is 17 * 3?\n\nYou MUST respond in **UNDER 64 tokens**")
    assert apply_style_and_hint(CONVERSATION, "boxed", None, POLICY)[-1]["content"] == (
        "What is 17 * 3?\n\nPlease reason step by step, and put your final answer within "
        "\\boxed{}.")
    assert apply_style_and_hint(CONVERSATION, None, None, POLICY) == CONVERSATION


def test_input_is_not_modified() -> None:
    original = [dict(m) for m in CONVERSATION]
    shaped = apply_style_and_hint(CONVERSATION, "boxed", 10, POLICY)
    assert original == CONVERSATION
    assert shaped[0] is not CONVERSATION[0]


def test_without_a_user_message_the_text_becomes_one() -> None:
    shaped = apply_style_and_hint([{"role": "system", "content": "sys"}], None, 8, POLICY)
    assert shaped == [{"role": "system", "content": "sys"},
                      {"role": "user", "content": "You MUST respond in **UNDER 8 tokens**"}]


def test_policy_template_and_ratio_are_used() -> None:
    policy = parse_policy(b'name = "p"\n[hint]\ntemplate = "Stay under {n} tokens."\n'
                          b"ratio = 0.25\n", "p.toml")
    assert hint_tokens_for(100, policy) == 25
    assert hint_text(25, policy) == "Stay under 25 tokens."


@pytest.mark.parametrize("max_tokens,expected", [(1, 1), (2, 1), (3, 1), (255, 127), (256, 128)])
def test_hint_tokens_is_half_rounded_down_at_least_one(max_tokens: int, expected: int) -> None:
    assert hint_tokens_for(max_tokens, POLICY) == expected


def test_unknown_style() -> None:
    with pytest.raises(UnknownStyleError, match="known styles"):
        apply_style_and_hint(CONVERSATION, "fancy", None, POLICY)


def test_builtin_styles_work_on_a_policy_built_in_code() -> None:
    shaped = apply_style_and_hint(CONVERSATION, "boxed", None, PolicyFile(name="code"))
    assert "\\boxed{}" in shaped[-1]["content"]


@pytest.mark.parametrize("text,left,expected", [
    ("Let me think", 30, False),
    ("Let me think", 24, True),
    ("Let me think", 1, True),
    ("Let me think", 0, False),
    ("so \\boxed{51", 10, False),
])
def test_answer_forcing(text: str, left: int, expected: bool) -> None:
    assert should_force_answer(text, left, POLICY) is expected


def test_answer_forcing_is_off_by_default() -> None:
    assert not should_force_answer("no answer yet", 1, PolicyFile(name="code"))
