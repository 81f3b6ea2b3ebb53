"""models.toml as msgspec Structs; a bad file fails naming the file and field. (The settings of
`edgeserve serve` are edgeserve.settings.ServerSettings.)"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import platformdirs

from edgeserve.errors import ConfigError

PACKAGE_SCHEME = "package://"
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN, max_length=64)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
PAIR_JOIN = "+"  # a speculative pair's name: target+draft (no configured name contains it)


class VariantConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """One GGUF quantization of a family: either an explicit `path` or a `quant` derived
    from the family's source by `edgeserve models prepare` — or, with ``kind = "remote"``, any
    OpenAI-compatible server at `base_url` (llama-server, vLLM, another edgeserve) serving
    `model`, with the API key read from the environment variable `api_key_env`."""

    name: Name
    kind: Literal["local", "remote"] = "local"
    base_url: str | None = None  # remote: e.g. http://10.0.0.2:8000/v1
    model: str | None = None  # remote: its `model` name (default: the variant's name)
    api_key_env: str | None = None  # remote: environment variable holding the bearer key
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0  # remote: connect and read timeout
    quant: str | None = None
    path: str | None = None
    n_ctx: Annotated[int, msgspec.Meta(ge=64, le=1_048_576)] = 2048
    n_threads: PositiveInt | None = None
    n_batch: PositiveInt = 512
    chat_template: str | None = None
    use_mlock: bool = False  # pin the weights in RAM (needs LimitMEMLOCK= under systemd)
    # How many requests of this variant share one batch (decoded together per step). Each keeps
    # the full n_ctx: the KV cache holds n_ctx × parallel tokens. 1: one request at a time.
    parallel: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    # Speculative decoding: another local variant of the family (a cheaper quantization) that
    # drafts up to `draft_max` tokens for this one to check in one pass. The pair is then one
    # more routing candidate, `<this>+<draft>` (for example q8_0+q2_k), with this variant's
    # quality and its own measured cost; both stay loaded, no weights are added.
    draft: Name | None = None
    draft_max: Annotated[int, msgspec.Meta(ge=1, le=16)] = 4
    # draft fewer tokens where the draft keeps being wrong (+2 after a step that accepted all,
    # -1 after one that did not, between 1 and draft_max, per request)
    draft_adaptive: bool = False

    @property
    def threads(self) -> int:
        return self.n_threads or os.cpu_count() or 1

    @property
    def remote(self) -> bool:
        return self.kind == "remote"


class FamilyConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A model family: its variants answer the same questions at different cost and quality.

    `policy` names the family's policy file (quality curves of THIS family's variants), relative
    to models.toml like `path`; without it, ``policies/<name>.toml`` beside models.toml is used if
    it exists (see ``edgeserve.policies.load_family_policies``)."""

    name: Name
    variants: list[VariantConfig]
    default_variant: str | None = None
    source: str | None = None
    source_sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")] | None = None
    source_quant: str | None = None
    policy: Annotated[str, msgspec.Meta(min_length=1)] | None = None

    def variant(self, name: str) -> VariantConfig | None:
        """A configured variant, or a speculative pair by its name (`q8_0+q2_k`)."""
        return next((v for v in self.routable if v.name == name), None)

    @property
    def speculative_variants(self) -> list[VariantConfig]:
        """One per local variant with a `draft`: named `<target>+<draft>`, with the target's
        settings (its context, threads and `parallel` places)."""
        return [msgspec.structs.replace(v, name=f"{v.name}{PAIR_JOIN}{v.draft}")
                for v in self.local_variants if v.draft is not None]

    @property
    def routable(self) -> list[VariantConfig]:
        """Every variant a request can run on: the configured ones, then the speculative pairs."""
        return [*self.variants, *self.speculative_variants]

    def pair_sequences(self, name: str) -> int:
        """Sequences of speculative pairs that variant `name`'s context holds beside its own
        `parallel` (as their target or their draft): they take KV cache memory too."""
        return sum(v.parallel for v in self.local_variants if v.draft is not None and name in (v.name, v.draft))

    def pair(self, name: str) -> tuple[VariantConfig, VariantConfig] | None:
        """(target, draft) of a speculative pair's name; None for any other name."""
        target_name, join, draft_name = name.partition(PAIR_JOIN)
        target = next((v for v in self.variants if v.name == target_name), None) if join else None
        if target is None or target.draft != draft_name:
            return None
        draft = next(v for v in self.variants if v.name == draft_name)
        return target, draft

    @property
    def local_variants(self) -> list[VariantConfig]:
        return [v for v in self.variants if not v.remote]

    @property
    def default(self) -> VariantConfig:
        """The variant a family's prompts are tokenized with: always a local one."""
        return self.variant(self.default_variant or "") or self.local_variants[0]


class ModelsFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    families: list[FamilyConfig]


def load_models_file(path: Path) -> ModelsFile:
    """Read and validate models.toml; every problem is a ConfigError naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read models file {path}: {exc.strerror or exc}") from exc
    try:
        models = msgspec.toml.decode(raw, type=ModelsFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {_explain(str(exc))}") from exc
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    _check_consistency(path, models)
    return models


def _explain(message: str) -> str:
    """Turn msgspec's `... - at `$.families[0].variants[1]`` into a friendlier location."""
    match = re.search(r" - at `\$\.?(.*)`$", message)
    if not match:  # msgspec adds no location for errors in the root object
        return f"at top level: {message}"
    where = match.group(1) or "top level"
    return f"at {where}: {message[: match.start()]}"


def _check_consistency(path: Path, models: ModelsFile) -> None:
    if not models.families:
        raise ConfigError(f"{path}: at families: expected at least one family")
    seen_families: set[str] = set()
    for i, family in enumerate(models.families):
        where = f"{path}: at families[{i}]"
        if family.name in seen_families:
            raise ConfigError(f"{where}.name: family '{family.name}' is defined twice")
        seen_families.add(family.name)
        if not family.variants:
            raise ConfigError(f"{where}.variants: expected at least one variant")
        names = [v.name for v in family.variants]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}.variants: variant names must be unique, got {names}")
        if family.default_variant is not None and family.default_variant not in names:
            raise ConfigError(
                f"{where}.default_variant: '{family.default_variant}' is not one of {names}"
            )
        if not family.local_variants:
            raise ConfigError(f"{where}.variants: a family needs at least one local variant (remote "
                              "variants use a local one's tokenizer to count prompt tokens)")
        if family.default_variant is not None and family.default.remote:
            raise ConfigError(f"{where}.default_variant: '{family.default_variant}' is remote; "
                              "the default variant must be a local GGUF")
        for j, variant in enumerate(family.variants):
            vwhere = f"{where}.variants[{j}]"
            if variant.remote:
                _check_remote(vwhere, variant)
                continue
            if variant.base_url is not None or variant.api_key_env is not None or variant.model is not None:
                raise ConfigError(f"{vwhere}: `base_url`, `model` and `api_key_env` are for "
                                  'kind = "remote" variants')
            if (variant.path is None) == (variant.quant is None):
                raise ConfigError(
                    f"{vwhere}: give exactly one of `path` (a GGUF file) or `quant` "
                    "(derived from the family's `source` by `edgeserve models prepare`)"
                )
            if variant.draft is not None:
                _check_draft(vwhere, family, variant)
            if variant.quant is not None and family.source is None:
                raise ConfigError(
                    f"{vwhere}.quant: variant '{variant.name}' is derived (quant = "
                    f"'{variant.quant}') but family '{family.name}' has no `source`"
                )


def _check_draft(where: str, family: FamilyConfig, variant: VariantConfig) -> None:
    draft = next((v for v in family.variants if v.name == variant.draft), None)
    locals_ = [v.name for v in family.local_variants if v.name != variant.name]
    if draft is None or draft.remote or draft is variant:
        raise ConfigError(f"{where}.draft: '{variant.draft}' is not another local variant of family "
                          f"'{family.name}' (one of {locals_})")
    if draft.n_ctx < variant.n_ctx:
        raise ConfigError(f"{where}.draft: the draft '{draft.name}' has n_ctx = {draft.n_ctx}, less than "
                          f"this variant's {variant.n_ctx}; a draft must hold every position its target does")


def _check_remote(where: str, variant: VariantConfig) -> None:
    if variant.draft is not None:
        raise ConfigError(f"{where}.draft: a remote variant cannot have a draft (speculative decoding "
                          "runs two local variants of this board)")
    if variant.path is not None or variant.quant is not None:
        raise ConfigError(f"{where}: a remote variant has no `path` or `quant` (it runs elsewhere)")
    if variant.base_url is None or not re.match(r"^https?://[^/\s]+", variant.base_url):
        raise ConfigError(f"{where}.base_url: a remote variant needs `base_url`, an http(s) URL of an "
                          f"OpenAI-compatible API such as http://10.0.0.2:8000/v1 (got {variant.base_url!r})")
    if variant.api_key_env is not None and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", variant.api_key_env):
        raise ConfigError(f"{where}.api_key_env: {variant.api_key_env!r} is not an environment variable name")


def resolve_path(base: Path, value: str) -> Path:
    """Paths in models.toml are relative to the file that names them; `~` expands."""
    candidate = Path(value).expanduser()
    return candidate if candidate.is_absolute() else (base / candidate).resolve()


def default_cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get("EDGESERVE_CACHE_DIR") or platformdirs.user_cache_dir("edgeserve"))


def default_models_path(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get("EDGESERVE_MODELS", "models.toml"))
