"""Where each family's routing policy comes from: reading policy files at start-up.

The server's side of edgeserve.routing.policy_file (which only parses and checks bytes, so the
routing layer stays free of I/O): ``load_policy`` reads one file, ``load_family_policies`` finds,
reads and checks the policy of every family of models.toml. A file that cannot be read or parsed
is a ConfigError naming it (and the field).

Which file a family routes with, first match wins:

1. ``--policy FILE`` (the ``override``), for the family FILE's ``family`` field names, or for the
   only family of models.toml when FILE names none;
2. the family's ``policy = "..."`` in models.toml (relative to models.toml, like ``path``);
3. ``policies/<family name>.toml`` beside models.toml;
4. ``policies/default.toml`` beside models.toml (the old single-policy layout), for the family its
   ``family`` field names, or for the only family when it names none;
5. none: the built-in policy with no quality curves, and a warning naming the family.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from edgeserve.config import FamilyConfig, ModelsFile, resolve_path
from edgeserve.errors import ConfigError
from edgeserve.routing.policy import uncovered_variants
from edgeserve.routing.policy_file import PolicyFile, check_policy_family, default_policy, parse_policy

BUILTIN_SOURCE = "built-in (no quality curves)"
LEGACY_DEFAULT = Path("policies") / "default.toml"


def load_policy(path: Path) -> PolicyFile:
    """Read and parse one policy file; a missing or unreadable file is a ConfigError naming it."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read policy file {path}: {exc.strerror or exc}") from exc
    return parse_policy(raw, str(path))


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
        if missing := uncovered_variants(policy, [v.name for v in family.variants]):
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
