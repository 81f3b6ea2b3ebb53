"""edgeserve/policies.py: reading policy files, and which file each family of models.toml routes with."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeserve.config import ModelsFile, load_models_file
from edgeserve.errors import ConfigError
from edgeserve.policies import BUILTIN_SOURCE, load_family_policies, load_policy
from edgeserve.routing.policy_file import BUILTIN_STYLES, PolicyFileError
from tests.unit.routing.conftest import POLICIES, ROOT

TEST_DATA = ROOT / "tests" / "data"


def test_load_policy_reads_and_parses_one_file(tmp_path: Path) -> None:
    policy = load_policy(POLICIES / "smollm2-135m.toml")
    assert policy.family == "smollm2-135m" and policy.curves
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"cannot read policy file {missing}"):
        load_policy(missing)
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "x"\n[routing]\nmin_useful_tokens = 0\n')
    with pytest.raises(PolicyFileError, match=f"^{broken}: at routing.min_useful_tokens"):
        load_policy(broken)


def family_toml(name: str, variants: tuple[str, ...] = ("q2_k", "q8_0"), policy: str | None = None) -> str:
    text = f'[[families]]\nname = "{name}"\n'
    if policy is not None:
        text += f'policy = "{policy}"\n'
    for variant in variants:
        text += f'[[families.variants]]\nname = "{variant}"\npath = "{name}-{variant}.gguf"\n'
    return text


def policy_toml(family: str | None, curves: dict[str, float]) -> str:
    text = 'name = "p"\n' + (f'family = "{family}"\n' if family is not None else "")
    for variant, accuracy in curves.items():
        text += f"[curves.{variant}.boxed]\nbudgets = [64]\naccuracy = [{accuracy}]\n"
    return text


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def models_at(tmp_path: Path, *families: str) -> tuple[ModelsFile, Path]:
    path = write(tmp_path / "models.toml", "".join(families))
    return load_models_file(path), path


def test_two_families_with_a_q8_0_each_route_by_their_own_curves() -> None:
    """tests/data/models-two-families.toml: the shipped family by its `policy` field, the test-only
    second family by policies/<name>.toml beside the models file; both have a q8_0."""
    path = TEST_DATA / "models-two-families.toml"
    loaded = load_family_policies(load_models_file(path), path)
    first, second = loaded.policies["smollm2-135m"], loaded.policies["smollm2-135m-b"]
    assert loaded.sources == {"smollm2-135m": str(POLICIES / "smollm2-135m.toml"),
                              "smollm2-135m-b": str(TEST_DATA / "policies" / "smollm2-135m-b.toml")}
    assert (first.family, second.family) == ("smollm2-135m", "smollm2-135m-b")
    assert first.curves == load_policy(POLICIES / "smollm2-135m.toml").curves
    assert first.curves["q8_0"]["boxed"].accuracy(128) == pytest.approx(0.05)
    assert second.curves["q8_0"]["boxed"].accuracy(128) == pytest.approx(0.20)
    # opposite rankings, so a routed request shows which family's curves it used
    assert first.curves["q8_0"]["boxed"].accuracy(128) > first.curves["q2_k"]["boxed"].accuracy(128)
    assert second.curves["q8_0"]["boxed"].accuracy(128) < second.curves["q2_k"]["boxed"].accuracy(128)
    assert loaded.warnings == [] and loaded.uncovered == {}


def test_the_shipped_models_file_routes_with_its_family_policy(models_file: ModelsFile) -> None:
    loaded = load_family_policies(models_file, ROOT / "models.toml")
    assert loaded.sources == {"smollm2-135m": str(POLICIES / "smollm2-135m.toml")}
    assert set(loaded.policies["smollm2-135m"].curves) == {"q2_k", "q4_1", "q8_0"}
    assert loaded.warnings == []


def test_a_family_policy_is_found_beside_the_models_file_by_the_family_name(tmp_path: Path) -> None:
    models, path = models_at(tmp_path, family_toml("fam"), family_toml("other", policy="elsewhere/o.toml"))
    beside = write(tmp_path / "policies" / "fam.toml", policy_toml("fam", {"q2_k": 0.3, "q8_0": 0.4}))
    write(tmp_path / "elsewhere" / "o.toml", policy_toml(None, {"q2_k": 0.5, "q8_0": 0.1}))
    write(tmp_path / "policies" / "other.toml", policy_toml("other", {"q2_k": 0.9}))  # `policy` wins
    loaded = load_family_policies(models, path)
    assert loaded.sources == {"fam": str(beside), "other": str(tmp_path / "elsewhere" / "o.toml")}
    assert loaded.policies["fam"].curves["q8_0"]["boxed"].accuracy(64) == 0.4
    assert loaded.policies["other"].curves["q8_0"]["boxed"].accuracy(64) == 0.1
    assert loaded.warnings == []


def test_a_policy_for_another_family_is_an_error_naming_both(tmp_path: Path) -> None:
    models, path = models_at(tmp_path, family_toml("fam", policy="p.toml"))
    write(tmp_path / "p.toml", policy_toml("llama31-8b", {"q8_0": 0.7}))
    with pytest.raises(ConfigError) as info:
        load_family_policies(models, path)
    message = info.value.message
    assert str(tmp_path / "p.toml") in message and "'llama31-8b'" in message and "'fam'" in message


def test_the_same_mistake_found_by_name_beside_the_models_file(tmp_path: Path) -> None:
    models, path = models_at(tmp_path, family_toml("fam"))
    write(tmp_path / "policies" / "fam.toml", policy_toml("other", {}))
    with pytest.raises(ConfigError, match="for family 'other' but is attached to family 'fam'"):
        load_family_policies(models, path)


def test_curves_for_variants_the_family_does_not_have_are_an_error(tmp_path: Path) -> None:
    models, path = models_at(tmp_path, family_toml("fam", policy="p.toml"))
    write(tmp_path / "p.toml", policy_toml("fam", {"q2_k": 0.1, "q4_k": 0.2, "f16": 0.3}))
    with pytest.raises(PolicyFileError) as info:
        load_family_policies(models, path)
    message = info.value.message
    assert message.startswith(f"{tmp_path / 'p.toml'}: ")
    assert "q4_k, f16" in message and "family 'fam'" in message and "q2_k, q8_0" in message


def test_remote_variants_count_as_the_family_s_variants(tmp_path: Path) -> None:
    remote = '[[families.variants]]\nname = "cloud"\nkind = "remote"\nbase_url = "http://10.0.0.2:8000/v1"\n'
    models, path = models_at(tmp_path, family_toml("fam", policy="p.toml") + remote)
    write(tmp_path / "p.toml", policy_toml("fam", {"q2_k": 0.1, "q8_0": 0.2, "cloud": 0.9}))
    loaded = load_family_policies(models, path)
    assert loaded.policies["fam"].curves["cloud"]["boxed"].accuracy(64) == 0.9


def test_a_family_without_a_policy_routes_without_curves_and_is_named_in_a_warning(tmp_path: Path) -> None:
    models, path = models_at(tmp_path, family_toml("fam", policy="p.toml"), family_toml("bare"))
    write(tmp_path / "p.toml", policy_toml("fam", {"q2_k": 0.1, "q8_0": 0.2}))
    loaded = load_family_policies(models, path)
    assert loaded.sources["bare"] == BUILTIN_SOURCE == "built-in (no quality curves)"
    assert loaded.policies["bare"].curves == {} and loaded.policies["bare"].styles == BUILTIN_STYLES
    (warning,) = loaded.warnings
    assert "family 'bare' routes without quality curves" in warning
    assert str(tmp_path / "policies" / "bare.toml") in warning  # where to put one


def test_variants_without_curves_are_warned_about_per_family(tmp_path: Path) -> None:
    models, path = models_at(tmp_path, family_toml("fam", policy="p.toml"),
                             family_toml("other", ("q2_k", "q8_0"), policy="o.toml"))
    write(tmp_path / "p.toml", policy_toml("fam", {"q8_0": 0.2}))
    write(tmp_path / "o.toml", policy_toml("other", {"q2_k": 0.2, "q8_0": 0.3}))
    loaded = load_family_policies(models, path)
    assert loaded.uncovered == {"fam": ["q2_k"]}  # other's q2_k is covered by its own file
    (warning,) = loaded.warnings
    assert warning.startswith("family 'fam': variants q2_k have no quality curve in ")
    assert str(tmp_path / "p.toml") in warning


def test_a_missing_policy_named_by_a_family_is_an_error(tmp_path: Path) -> None:
    models, path = models_at(tmp_path, family_toml("fam", policy="policies/nope.toml"))
    with pytest.raises(ConfigError) as info:
        load_family_policies(models, path)
    assert info.value.message.startswith(f"{path}: family 'fam' has policy = \"policies/nope.toml\", but ")
    assert str(tmp_path / "policies" / "nope.toml") in info.value.message
    override = write(tmp_path / "test.toml", policy_toml("fam", {}))  # e.g. models.toml copied to /tmp
    assert load_family_policies(models, path, override).sources == {"fam": str(override)}


def test_the_override_replaces_the_policy_of_the_only_family(tmp_path: Path) -> None:
    models, path = models_at(tmp_path, family_toml("fam", policy="p.toml"))
    write(tmp_path / "p.toml", policy_toml("fam", {"q8_0": 0.2}))
    override = write(tmp_path / "test.toml", policy_toml(None, {"q2_k": 0.9, "q8_0": 0.8}))
    loaded = load_family_policies(models, path, override)
    assert loaded.sources == {"fam": str(override)}
    assert loaded.policies["fam"].curves["q2_k"]["boxed"].accuracy(64) == 0.9


def test_with_two_families_the_override_is_for_the_family_it_names(tmp_path: Path) -> None:
    models, path = models_at(tmp_path, family_toml("fam", policy="p.toml"), family_toml("other", policy="o.toml"))
    write(tmp_path / "p.toml", policy_toml("fam", {"q8_0": 0.2, "q2_k": 0.1}))
    write(tmp_path / "o.toml", policy_toml("other", {"q8_0": 0.3, "q2_k": 0.1}))
    override = write(tmp_path / "test.toml", policy_toml("other", {"q2_k": 0.9, "q8_0": 0.8}))
    loaded = load_family_policies(models, path, override)
    assert loaded.sources == {"fam": str(tmp_path / "p.toml"), "other": str(override)}
    unnamed = write(tmp_path / "unnamed.toml", policy_toml(None, {}))
    with pytest.raises(ConfigError, match=r"cannot tell which family this policy is for.*fam, other"):
        load_family_policies(models, path, unnamed)
    stranger = write(tmp_path / "stranger.toml", policy_toml("llama31-8b", {}))
    with pytest.raises(ConfigError, match="'llama31-8b' is not a family of"):
        load_family_policies(models, path, stranger)
    wrong_variants = write(tmp_path / "wrong.toml", policy_toml("fam", {"q4_k": 0.5}))
    with pytest.raises(ConfigError, match="variants q4_k are not variants of family 'fam'"):
        load_family_policies(models, path, wrong_variants)


def test_the_old_policies_default_toml_still_serves_a_single_family(tmp_path: Path) -> None:
    models, path = models_at(tmp_path, family_toml("fam"))
    legacy = write(tmp_path / "policies" / "default.toml", policy_toml(None, {"q8_0": 0.2}))
    loaded = load_family_policies(models, path)
    assert loaded.sources == {"fam": str(legacy)}
    assert loaded.uncovered == {"fam": ["q2_k"]}
    write(legacy, policy_toml("other", {"q8_0": 0.2}))  # ... but not a family it is not for
    loaded = load_family_policies(models, path)
    assert loaded.sources == {"fam": BUILTIN_SOURCE}
    assert any("is not used: it is for family 'other'" in w for w in loaded.warnings)


def test_the_old_policies_default_toml_with_two_families(tmp_path: Path) -> None:
    models, path = models_at(tmp_path, family_toml("fam"), family_toml("other"))
    legacy = write(tmp_path / "policies" / "default.toml", policy_toml(None, {"q8_0": 0.2}))
    loaded = load_family_policies(models, path)
    assert set(loaded.sources.values()) == {BUILTIN_SOURCE}  # it names no family: used by neither
    assert any("names no `family`" in w for w in loaded.warnings)
    write(legacy, policy_toml("other", {"q8_0": 0.2}))
    loaded = load_family_policies(models, path)
    assert loaded.sources == {"fam": BUILTIN_SOURCE, "other": str(legacy)}
    write(tmp_path / "policies" / "other.toml", policy_toml("other", {"q8_0": 0.2}))
    write(tmp_path / "policies" / "fam.toml", policy_toml("fam", {"q8_0": 0.2}))
    loaded = load_family_policies(models, path)
    assert str(legacy) not in loaded.sources.values()
    assert any("is not used: every family" in w for w in loaded.warnings)
