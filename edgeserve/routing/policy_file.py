"""Policy files (TOML): quality curves, prompt styles, the budget hint and the routing knobs.

A policy belongs to ONE model family: its curves are keyed by that family's variant names, so two
families that both have a ``q8_0`` each need their own file. ``parse_policy`` takes bytes and fails
with a PolicyFileError naming the file and the field, like models.toml; ``load_policy`` reads one
file and ``load_family_policies`` finds and checks every family's policy at start-up (the only
functions here that read files). Layout::

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

A curve keyed by a style is measured with the budget hint on; ``<style>-nohint`` with it off.

Which file a family routes with (``load_family_policies``), first match wins:

1. ``--policy FILE`` (the ``override``), for the family FILE's ``family`` field names, or for the
   only family of models.toml when FILE names none;
2. the family's ``policy = "..."`` in models.toml (relative to models.toml, like ``path``);
3. ``policies/<family name>.toml`` beside models.toml;
4. ``policies/default.toml`` beside models.toml (the old single-policy layout), for the family its
   ``family`` field names, or for the only family when it names none;
5. none: the built-in policy with no quality curves, and a warning naming the family.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from edgeserve.errors import ConfigError
from edgeserve.routing.quality import QualityCurve

if TYPE_CHECKING:  # edgeserve.config imports this module (its `load_policy` is this one)
    from edgeserve.config import FamilyConfig, ModelsFile

NOHINT_SUFFIX = "-nohint"
BUILTIN_SOURCE = "built-in (no quality curves)"
LEGACY_DEFAULT = Path("policies") / "default.toml"
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
    """When ``reserve_tokens`` remain and no final answer has appeared, append ``prefix``."""

    enabled: bool = False
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

    def curve_for(self, variant_name: str, style: str | None, hint: bool) -> QualityCurve | None:
        """The curve that best describes this variant for this style and hint setting.

        Order: the style as asked (hint on: ``style`` then ``style-nohint``; hint off: the
        reverse), then the same for ``default_style``. None when the variant has no curve at all.
        """
        by_style = self.curves.get(variant_name)
        if not by_style:
            return None
        for name in dict.fromkeys((style or self.default_style, self.default_style)):
            keys = (name, name + NOHINT_SUFFIX) if hint else (name + NOHINT_SUFFIX, name)
            for key in keys:
                if key in by_style:
                    return by_style[key]
        return None


def default_policy(name: str = "builtin") -> PolicyFile:
    """A policy with no curves: every setting at its default, the built-in styles."""
    return PolicyFile(name=name, styles=dict(BUILTIN_STYLES))


def load_policy(path: Path) -> PolicyFile:
    """Read and parse one policy file; a missing or unreadable file is a ConfigError naming it."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read policy file {path}: {exc.strerror or exc}") from exc
    return parse_policy(raw, str(path))


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
            base = key.removesuffix(NOHINT_SUFFIX)
            if base not in policy.styles:
                raise PolicyFileError(
                    f"{source_name}: at curves.{variant}.{key}: unknown style '{base}'; "
                    f"known styles: {styles} (append '{NOHINT_SUFFIX}' for a curve measured "
                    "without the budget hint)"
                )


# ---- one policy per family ---------------------------------------------------------------------


class FamilyPolicies(msgspec.Struct, kw_only=True, frozen=True):
    """Every family's policy, where it came from, and what start-up should warn about.

    ``policies`` and ``sources`` have one entry per family of models.toml (family name → policy,
    family name → the file's path or ``BUILTIN_SOURCE``); ``uncovered`` lists, per family with a
    policy file, the variants that file gives no curve (they rank as accuracy 0); ``warnings`` says
    both in words, one line per family.
    """

    policies: dict[str, PolicyFile]
    sources: dict[str, str]
    warnings: list[str] = msgspec.field(default_factory=list)
    uncovered: dict[str, list[str]] = msgspec.field(default_factory=dict)


def load_family_policies(
    models: ModelsFile, models_path: Path, override: Path | None = None
) -> FamilyPolicies:
    """Find, read and check the policy of every family in ``models`` (see the module docstring for
    the order). A policy attached to a family must not name another family in its ``family`` field
    and may have curves only for that family's variants (local or remote); either mistake is a
    ConfigError naming the file and the family. ``override`` is ``edgeserve serve --policy``."""
    base = models_path.resolve().parent
    names = [family.name for family in models.families]
    chosen: dict[str, tuple[PolicyFile, str]] = {}
    warnings: list[str] = []
    if override is not None:
        policy = load_policy(override)
        chosen[_override_target(policy, override, names, models_path)] = (policy, str(override))
    for family in models.families:
        if family.name not in chosen and (path := _own_policy_path(family, base, models_path)) is not None:
            chosen[family.name] = (load_policy(path), str(path))
    if (legacy := base / LEGACY_DEFAULT).is_file():
        _attach_legacy(legacy, chosen, names, models_path, warnings)
    policies: dict[str, PolicyFile] = {}
    sources: dict[str, str] = {}
    uncovered: dict[str, list[str]] = {}
    for family in models.families:
        if family.name not in chosen:
            policies[family.name], sources[family.name] = default_policy(), BUILTIN_SOURCE
            warnings.append(
                f"family '{family.name}' routes without quality curves: no policy file (set `policy = "
                f"\"...\"` on it in {models_path} or add {base / 'policies' / (family.name + '.toml')}); "
                "its variants rank as accuracy 0, so the router picks by cost alone"
            )
            continue
        policy, source = chosen[family.name]
        check_policy_family(policy, source, family)
        policies[family.name], sources[family.name] = policy, source
        if missing := _uncovered(policy, [v.name for v in family.variants]):
            uncovered[family.name] = missing
            warnings.append(
                f"family '{family.name}': variants {', '.join(missing)} have no quality curve in "
                f"{source}; they rank as accuracy 0 (picked only when nothing better fits): run the "
                "GSM8K sweep to write their curves"
            )
    return FamilyPolicies(policies=policies, sources=sources, warnings=warnings, uncovered=uncovered)


def _override_target(policy: PolicyFile, path: Path, names: list[str], models_path: Path) -> str:
    """The family ``--policy`` replaces the policy of: the one its ``family`` field names, or the
    only family of models.toml."""
    if policy.family is None and len(names) != 1:
        raise ConfigError(
            f"{path}: cannot tell which family this policy is for: it has no `family` field and "
            f"{models_path} has {len(names)} families ({', '.join(names)}); set `family = \"<name>\"` "
            f"in it, or give each family its own `policy = \"...\"` in {models_path}"
        )
    target = policy.family or names[0]
    if target not in names:
        raise ConfigError(
            f"{path}: at family: '{target}' is not a family of {models_path} (families: {', '.join(names)})"
        )
    return target


def _own_policy_path(family: FamilyConfig, base: Path, models_path: Path) -> Path | None:
    """The family's `policy` (which must exist), else policies/<family>.toml if it exists."""
    from edgeserve.config import resolve_path  # edgeserve.config imports this module

    if family.policy is not None:
        path = resolve_path(base, family.policy)
        if not path.is_file():
            raise ConfigError(
                f"{models_path}: family '{family.name}' has policy = \"{family.policy}\", but {path} is not "
                "a file (a relative path is relative to the models file; `--policy FILE` replaces it)"
            )
        return path
    beside = base / "policies" / f"{family.name}.toml"
    return beside if beside.is_file() else None


def _attach_legacy(legacy: Path, chosen: dict[str, tuple[PolicyFile, str]], names: list[str],
                   models_path: Path, warnings: list[str]) -> None:
    """policies/default.toml of the single-policy layout: the policy of the family its `family`
    field names (or of the only family) if that family has none of its own; else a warning."""
    if legacy.resolve() in {Path(source).resolve() for _, source in chosen.values()}:
        return  # named as some family's policy, or by --policy
    if len(chosen) == len(names):
        warnings.append(f"{legacy} is not used: every family of {models_path} has its own policy")
        return
    policy = load_policy(legacy)
    target = policy.family or (names[0] if len(names) == 1 else None)
    if target is None:
        warnings.append(f"{legacy} is not used: it names no `family` and {models_path} has {len(names)} "
                        "families (set `family = \"<name>\"` in it, or rename it policies/<family>.toml)")
    elif target not in names:
        warnings.append(f"{legacy} is not used: it is for family '{target}', not a family of {models_path}")
    elif target in chosen:
        warnings.append(f"{legacy} is not used: family '{target}' has its own policy ({chosen[target][1]})")
    else:
        chosen[target] = (policy, str(legacy))


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


def _uncovered(policy: PolicyFile, names: list[str]) -> list[str]:
    from edgeserve.routing.policy import uncovered_variants  # policy.py imports this module

    return uncovered_variants(policy, names)
