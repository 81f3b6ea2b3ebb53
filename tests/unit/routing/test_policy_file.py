from __future__ import annotations

import pytest

from edgeserve.errors import ConfigError
from edgeserve.routing.policy_file import (
    BUILTIN_STYLES,
    PolicyFileError,
    default_policy,
    parse_policy,
)
from tests.unit.routing.conftest import POLICIES

SOURCE = "policies/broken.toml"
CURVE = "budgets = [64, 128]\naccuracy = [0.1, 0.2]\n"


@pytest.mark.parametrize("name", ["smollm2-135m.toml", "llama31-8b-rk3568.toml", "qwen25-coder-05b.toml"])
def test_shipped_policies_parse(name: str) -> None:
    policy = parse_policy((POLICIES / name).read_bytes(), name)
    assert policy.default_style == "boxed"
    assert {"boxed", "aav"} <= set(policy.styles)
    assert policy.hint.template == "You MUST respond in **UNDER {n} tokens**"
    assert policy.hint.ratio == 0.5
    assert policy.answer_forcing.prefix == "\nFinal answer: \\boxed{"
    assert policy.curves


def test_default_policy_shape() -> None:
    policy = parse_policy((POLICIES / "smollm2-135m.toml").read_bytes(), "smollm2-135m.toml")
    assert policy.family == "smollm2-135m"
    assert set(policy.curves) == {"q2_k", "q4_1", "q8_0"}
    for variant in ("q2_k", "q4_1", "q8_0"):
        for style in ("boxed", "aav"):
            curve = policy.curves[variant][style]
            for budget in (16, 64, 256, 1000):
                assert 0 <= curve.accuracy(budget) < 0.1  # a 135M model solves a few % of GSM8K
    # both styles were swept at the same budgets: what the router compares is measured, not guessed
    for curves in policy.curves.values():
        assert list(curves["aav"].budgets) == list(curves["boxed"].budgets) == [32, 64, 128, 256, 512]


def test_study_policy_matches_the_published_figures() -> None:
    policy = parse_policy((POLICIES / "llama31-8b-rk3568.toml").read_bytes(), "study")
    assert policy.curves["q2_k"]["boxed-nohint"].accuracy_unlimited == pytest.approx(0.516)
    assert policy.curves["q8_0"]["boxed-nohint"].accuracy_unlimited == pytest.approx(0.709)


def test_minimal_file_gets_defaults_and_builtin_styles() -> None:
    policy = parse_policy(b'name = "tiny"\n', "tiny.toml")
    assert policy.styles == BUILTIN_STYLES
    assert policy.routing.min_useful_tokens == 16
    assert policy.routing.safety_margin_ms == 50
    assert policy.routing.safety_margin_ratio == 0.05
    assert policy.routing.default_max_tokens == 256
    assert policy.hint.enabled is True
    assert policy.answer_forcing.enabled is False
    assert policy.answer_forcing.reserve_tokens == 24
    assert default_policy().styles == BUILTIN_STYLES


def test_a_file_may_override_and_add_styles() -> None:
    policy = parse_policy(b'name = "x"\ndefault_style = "terse"\n[styles.terse]\n'
                          b'instruction = "Answer in one line."\n[styles.boxed]\n'
                          b'instruction = "Box it."\n', "x.toml")
    assert policy.styles["terse"].instruction == "Answer in one line."
    assert policy.styles["boxed"].instruction == "Box it."
    assert policy.styles["aav"] == BUILTIN_STYLES["aav"]


@pytest.mark.parametrize("text,where", [
    ('colour = "red"\n', "unknown field `colour`"),
    ("", "missing required field `name`"),
    ('name = "x"\n[routing]\nmin_useful_tokens = 0\n', "at routing.min_useful_tokens"),
    ('name = "x"\n[routing]\nsafety_margin_ratio = 1.0\n', "at routing.safety_margin_ratio"),
    ('name = "x"\n[routing]\nsafety_margin_ms = "50"\n', "at routing.safety_margin_ms"),
    ('name = "x"\n[routing]\nretries = 3\n', "at routing: Object contains unknown field `retries`"),
    ('name = "x"\n[hint]\nratio = 0\n', "at hint.ratio"),
    ('name = "x"\n[hint]\ntemplate = "be brief"\n', "at hint.template: must contain {n}"),
    ('name = "x"\n[hint]\ntemplate = "under {n} {unit}"\n', "at hint.template"),
    ('name = "x"\n[answer_forcing]\nreserve_tokens = 0\n', "at answer_forcing.reserve_tokens"),
    ('name = "x"\ndefault_style = "fancy"\n', "at default_style: 'fancy' is not one of"),
    ('name = "x"\n[styles.terse]\ntext = "hi"\n', "at styles"),
    ('name = "x"\n[curves.q8_0.boxed]\nbudgets = [128, 64]\naccuracy = [0.1, 0.2]\n',
     "at curves.q8_0.boxed: `budgets` must increase strictly"),
    ('name = "x"\n[curves.q8_0.boxed]\nbudgets = [64, 128]\naccuracy = [0.1, 1.2]\n',
     "at curves.q8_0.boxed.accuracy[1]"),
    ('name = "x"\n[curves.q8_0.boxed]\nbudgets = [64, 128]\naccuracy = [0.1]\n',
     "at curves.q8_0.boxed: `budgets` has 2 entries but `accuracy` has 1"),
    ('name = "x"\n[curves.q8_0.boxed]\n' + CURVE + "unlimted = 0.5\n",
     "at curves.q8_0.boxed: Object contains unknown field `unlimted`"),
    ('name = "x"\n[curves.q8_0.boxed]\nbudgets = [64]\n',
     "at curves.q8_0.boxed: Object missing required field `accuracy`"),
    ('name = "x"\n[curves.q8_0.fancy]\n' + CURVE, "at curves.q8_0.fancy: unknown style 'fancy'"),
    ('name = "x"\n[curves]\nq8_0 = 3\n', "at curves.q8_0: expected a table of styles"),
    ('name = "x"\ncurves = 3\n', "at curves: expected a table"),
    ('name = "x"\n[curves.q8_0\n', "not valid TOML"),
])
def test_errors_name_the_file_and_the_field(text: str, where: str) -> None:
    with pytest.raises(PolicyFileError) as info:
        parse_policy(text.encode(), SOURCE)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}: ")
    assert where in message
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, ConfigError)  # the CLI prints it like a models.toml error


def test_curve_lookup_order() -> None:
    text = ('name = "x"\n'
            '[curves.a.boxed]\nbudgets = [10]\naccuracy = [0.1]\n'
            '[curves.a.boxed-nohint]\nbudgets = [10]\naccuracy = [0.2]\n'
            '[curves.a.aav-nohint]\nbudgets = [10]\naccuracy = [0.3]\n'
            '[curves.b.boxed-nohint]\nbudgets = [10]\naccuracy = [0.4]\n')
    policy = parse_policy(text.encode(), "x.toml")

    def value(variant: str, style: str | None, hint: bool) -> float | None:
        curve = policy.curve_for(variant, style, hint)
        return None if curve is None else curve.accuracy(10)

    assert value("a", "boxed", True) == 0.1
    assert value("a", "boxed", False) == 0.2
    assert value("a", None, True) == 0.1
    assert value("a", "aav", False) == 0.3
    assert value("a", "aav", True) == 0.3  # only the no-hint curve exists for aav
    assert value("b", "aav", True) == 0.4  # falls back to the default style
    assert value("c", "boxed", True) is None


def test_forced_curves_are_found_first_when_forcing_and_fall_back_to_the_plain_ones() -> None:
    policy = parse_policy(b"""
name = "p"
[curves.q8_0.boxed]
budgets = [100]
accuracy = [0.3]
[curves.q8_0.boxed-nohint-forced]
budgets = [100]
accuracy = [0.6]
[curves.q8_0.aav-nohint]
budgets = [100]
accuracy = [0.2]
""", "p.toml")
    forced = policy.curve_for("q8_0", "boxed", False, forced=True)
    assert forced is not None and forced.accuracy(100) == pytest.approx(0.6)
    plain = policy.curve_for("q8_0", "boxed", False)
    assert plain is not None and plain.accuracy(100) == pytest.approx(0.3)
    fallback = policy.curve_for("q8_0", "aav", True, forced=True)
    assert fallback is not None and fallback.accuracy(100) == pytest.approx(0.2)
    assert policy.has_forced_curve("q8_0", "boxed", True)
    assert not policy.has_forced_curve("q8_0", "aav", True)
    assert policy.measured_styles(["q8_0"]) == ["boxed", "aav"]
    assert policy.measured_styles(["other"]) == ["boxed"]


def test_a_forced_curve_of_an_unknown_style_is_refused() -> None:
    with pytest.raises(PolicyFileError, match=r"curves\.q8_0\.poem-forced: unknown style 'poem'"):
        parse_policy(b'name = "p"\n[curves.q8_0.poem-forced]\nbudgets = [1]\naccuracy = [0.1]\n', "p.toml")
