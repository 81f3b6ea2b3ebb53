"""Policy files (TOML): quality curves, prompt styles, the budget hint and the routing knobs.

A policy belongs to ONE model family: its curves are keyed by that family's variant names, so two
families that both have a ``q8_0`` each need their own file. ``parse_policy`` takes bytes and fails
with a PolicyFileError naming the file and the field, like models.toml; ``check_policy_family``
checks that a policy fits the family it is attached to. Pure like the rest of edgeserve.routing:
reading the files (``load_policy``) and finding each family's policy at start-up
(``load_family_policies``) is the server's job, in edgeserve.policies. Layout::

    name = "llama31-8b-rk3568"
    description = "..."
    family = "llama31-8b"            # the models.toml family this policy is for (checked at load)
    default_style = "boxed"

    [hint]                           # told to the model: n = floor(ratio * max_tokens)
    template = "You MUST respond in **UNDER {n} tokens**"
    ratio = 0.5
    enabled = true

    [styles.boxed]                   # built-in `boxed` and `aav` exist unless overridden here
    instruction = "..."

    [answer_forcing]
    enabled = false
    reserve_tokens = 24
    prefix = "\\nFinal answer: \\\\boxed{"

    [routing]
    min_useful_tokens = 16
    safety_margin_ms = 50
    safety_margin_ratio = 0.05
    default_max_tokens = 256

    [curves.q8_0.boxed]              # curves.<variant name>.<style>
    budgets = [64, 128, 256, 512]
    accuracy = [0.05, 0.30, 0.60, 0.70]
    unlimited = 0.709

    [curves.q8_0.boxed-nohint]       # optional: the same style measured with the hint off
    [curves.q8_0.boxed-forced]       # optional: measured with answer forcing on (hint on)

A curve keyed by a style is measured with the budget hint on; ``<style>-nohint`` with it off;
``-forced`` after either: with answer forcing on. Where a forced curve exists, a request that
leaves forcing to the router (``answer_forcing.auto``, or X-Answer-Forcing: auto) gets forcing
exactly when that curve promises more at its budget.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from edgeserve.errors import ConfigError
from edgeserve.routing.quality import QualityCurve

if TYPE_CHECKING:  # a type only: the routing layer does not import the server's configuration
    from edgeserve.config import FamilyConfig

NOHINT_SUFFIX = "-nohint"
FORCED_SUFFIX = "-forced"
DEFAULT_HINT_TEMPLATE = "You MUST respond in **UNDER {n} tokens**"
StyleName = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]*$", max_length=32)]


class PolicyFileError(ConfigError, ValueError):
    """A policy file is malformed or inconsistent; the message names the file and the field."""


class HintConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    template: str = DEFAULT_HINT_TEMPLATE
    ratio: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.5
    enabled: bool = True


class StyleConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A prompt style: ``instruction`` is appended to the last user message (see hints.py)."""

    instruction: str
    description: str = ""


class AnswerForcingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """When ``reserve_tokens`` remain (or time runs short) and no final answer has appeared,
    append ``prefix``. ``enabled``: the default of a request that does not say; ``auto``: the
    router decides per request from the ``-forced`` curves instead (X-Answer-Forcing overrides)."""

    enabled: bool = False
    auto: bool = False
    reserve_tokens: Annotated[int, msgspec.Meta(ge=1)] = 24
    prefix: str = "\nFinal answer: \\boxed{"


class RoutingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """``safety margin = max(safety_margin_ms, safety_margin_ratio * deadline)``."""

    min_useful_tokens: Annotated[int, msgspec.Meta(ge=1)] = 16
    safety_margin_ms: Annotated[float, msgspec.Meta(ge=0.0)] = 50.0
    safety_margin_ratio: Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)] = 0.05
    default_max_tokens: Annotated[int, msgspec.Meta(ge=1)] = 256


BUILTIN_STYLES: dict[str, StyleConfig] = {
    "boxed": StyleConfig(
        instruction="Please reason step by step, and put your final answer within \\boxed{}.",
        description="step-by-step reasoning, final answer in \\boxed{}",
    ),
    "aav": StyleConfig(
        instruction=(
            "First give a quick answer. Then verify it step by step and correct it if needed. "
            "Put your final answer within \\boxed{}."
        ),
        description="answer, then verify; final answer in \\boxed{}",
    ),
}


class PolicyFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    description: str = ""
    family: str | None = None
    default_style: StyleName = "boxed"
    hint: HintConfig = msgspec.field(default_factory=HintConfig)
    styles: dict[StyleName, StyleConfig] = msgspec.field(default_factory=dict)
    answer_forcing: AnswerForcingConfig = msgspec.field(default_factory=AnswerForcingConfig)
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    curves: dict[str, dict[str, QualityCurve]] = msgspec.field(default_factory=dict)

    def curve_for(self, variant_name: str, style: str | None, hint: bool, *,
                  forced: bool = False) -> QualityCurve | None:
        """The curve that best describes this variant for this style, hint and forcing setting.

        Order: the style as asked (hint on: ``style`` then ``style-nohint``; hint off: the
        reverse; forced: the ``-forced`` ones of these first), then the same for
        ``default_style``. None when the variant has no curve at all.
        """
        by_style = self.curves.get(variant_name)
        if not by_style:
            return None
        for name in dict.fromkeys((style or self.default_style, self.default_style)):
            keys: tuple[str, ...] = (name, name + NOHINT_SUFFIX) if hint else (name + NOHINT_SUFFIX, name)
            if forced:
                keys = (*(key + FORCED_SUFFIX for key in keys), *keys)
            for key in keys:
                if key in by_style:
                    return by_style[key]
        return None

    def has_forced_curve(self, variant_name: str, style: str, hint: bool) -> bool:
        """Whether forcing was measured for this variant and style (hint as given, else the other)."""
        by_style = self.curves.get(variant_name, {})
        return any(key + FORCED_SUFFIX in by_style for key in (style, style + NOHINT_SUFFIX))

    def measured_styles(self, variant_names: Sequence[str]) -> list[str]:
        """The styles some of these variants have a curve for, the default style first."""
        found = {key.removesuffix(FORCED_SUFFIX).removesuffix(NOHINT_SUFFIX)
                 for name in variant_names for key in self.curves.get(name, {})}
        return [self.default_style, *sorted(found - {self.default_style})]


def default_policy(name: str = "builtin") -> PolicyFile:
    """A policy with no curves: every setting at its default, the built-in styles."""
    return PolicyFile(name=name, styles=dict(BUILTIN_STYLES))


def parse_policy(raw: bytes, source_name: str) -> PolicyFile:
    """Decode and validate a policy file; every problem is a PolicyFileError naming
    ``source_name`` and the field."""
    try:
        data: Any = msgspec.toml.decode(raw)
    except msgspec.DecodeError as exc:
        raise PolicyFileError(f"{source_name}: not valid TOML: {exc}") from exc
    if not isinstance(data, dict):
        raise PolicyFileError(f"{source_name}: expected a TOML table at the top level")
    raw_curves = data.pop("curves", {})
    try:
        policy = msgspec.convert(data, PolicyFile)
    except msgspec.ValidationError as exc:
        raise PolicyFileError(f"{source_name}: {_explain(str(exc))}") from exc
    curves = _convert_curves(source_name, raw_curves)
    policy = msgspec.structs.replace(
        policy, styles={**BUILTIN_STYLES, **policy.styles}, curves=curves
    )
    _check_consistency(source_name, policy)
    return policy


def _explain(message: str, prefix: str = "") -> str:
    """Turn msgspec's ``... - at `$.routing.ratio``` into ``at routing.ratio: ...``."""
    match = re.search(r" - at `\$\.?(.*)`$", message)
    if not match:
        return f"at {prefix}: {message}" if prefix else message
    inner = match.group(1)
    where = ".".join(part for part in (prefix, inner) if part).replace(".[", "[") or "top level"
    return f"at {where}: {message[: match.start()]}"


def _convert_curves(source_name: str, raw: Any) -> dict[str, dict[str, QualityCurve]]:
    """Curves one by one, so an error names ``curves.<variant>.<style>`` (msgspec shows dict
    keys as ``[...]``)."""
    if not isinstance(raw, dict):
        raise PolicyFileError(f"{source_name}: at curves: expected a table of variants")
    curves: dict[str, dict[str, QualityCurve]] = {}
    for variant, by_style in raw.items():
        if not isinstance(by_style, dict):
            raise PolicyFileError(
                f"{source_name}: at curves.{variant}: expected a table of styles, "
                f"e.g. [curves.{variant}.boxed]"
            )
        curves[variant] = {}
        for style, spec in by_style.items():
            where = f"curves.{variant}.{style}"
            try:
                curves[variant][style] = msgspec.convert(spec, QualityCurve)
            except msgspec.ValidationError as exc:
                raise PolicyFileError(f"{source_name}: {_explain(str(exc), where)}") from exc
    return curves


def _check_consistency(source_name: str, policy: PolicyFile) -> None:
    try:
        policy.hint.template.format(n=1)
    except (KeyError, IndexError, ValueError) as exc:
        raise PolicyFileError(
            f"{source_name}: at hint.template: the only placeholder allowed is {{n}} "
            f"(the token count), got {policy.hint.template!r} ({exc!r})"
        ) from exc
    if "{n}" not in policy.hint.template:
        raise PolicyFileError(
            f"{source_name}: at hint.template: must contain {{n}}, the token count to stay under"
        )
    styles = sorted(policy.styles)
    if policy.default_style not in policy.styles:
        raise PolicyFileError(
            f"{source_name}: at default_style: '{policy.default_style}' is not one of {styles}"
        )
    for variant, by_style in policy.curves.items():
        for key in by_style:
            base = key.removesuffix(FORCED_SUFFIX).removesuffix(NOHINT_SUFFIX)
            if base not in policy.styles:
                raise PolicyFileError(
                    f"{source_name}: at curves.{variant}.{key}: unknown style '{base}'; "
                    f"known styles: {styles} (append '{NOHINT_SUFFIX}' for a curve measured "
                    f"without the budget hint, then '{FORCED_SUFFIX}' for one measured with answer forcing)"
                )


# ---- a policy attached to a family -------------------------------------------------------------


def check_policy_family(policy: PolicyFile, source_name: str, family: FamilyConfig) -> None:
    """A policy attached to ``family`` must be for it: its ``family`` field (when set) names it,
    and every variant it has curves for is one of the family's (remote variants count)."""
    if policy.family is not None and policy.family != family.name:
        raise PolicyFileError(
            f"{source_name}: at family: this policy is for family '{policy.family}' but is attached "
            f"to family '{family.name}' (its curves are keyed by the variant names of '{policy.family}')"
        )
    variants = [v.name for v in family.variants]
    if unknown := [name for name in policy.curves if name not in variants]:
        raise PolicyFileError(
            f"{source_name}: at curves: variants {', '.join(unknown)} are not variants of family "
            f"'{family.name}' (its variants: {', '.join(variants)})"
        )
