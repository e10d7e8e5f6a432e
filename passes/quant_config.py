"""Quantization configs (torchao style), the per-layer-kind policy, its TOML file, and their serialisation.

A config is a small frozen dataclass saying what to do to a linear layer; passes/quantize.py keeps a handler
registry keyed by config type that turns one into a weight format of codegen/quant.py for a target:
- `Float8Config(activations=True)`: fp8_w8a8 where the target has FP8 tensor cores (sm_89+, and cpu, where the
  reference runs), fp8_w8a16 otherwise (and when activations=False);
- `Int8Config(smooth_alpha=0.5)`: int8_w8a8 with SmoothQuant smoothing of strength alpha (needs calibration);
  alpha 0 is plain round-to-nearest (the SmoothQuant formula at alpha 0 would move all difficulty into the
  activations instead);
- `Int8WeightOnlyConfig()`: int8_w8a16, round-to-nearest per output channel, weight-only;
- `Int4WeightOnlyConfig(group_size=128, awq=False)`: int4_w4a16, round-to-nearest or AWQ (needs calibration);
- `Int4W4A8Config(group_size=128)`: int4_w4a8, round-to-nearest.
`QuantPolicy` maps layer kinds (`layer_kind` of a weight name: "attention", "mlp", "lm_head", "other") to configs
and to a structured-sparsity pattern. "default" covers the kinds no rule names, except lm_head: like AWQ and
GPTQ, every scheme keeps the output projection in 16 bits unless a rule names it. Norms and embeddings are no
GEMMs and are never quantized.

Policy file (TOML), sections default / attention / mlp / lm_head, each with `quant` (a scheme name as --quant
takes it, or "none"), `sparsity` ("2:4" or "none") and the config's own fields as overrides:

    version = 1
    [default]
    quant = "none"
    [mlp]
    quant = "w4a8"
    group_size = 128
    [attention]
    quant = "fp8"

A section states its kind completely: keys it leaves out mean "none", not the default section's value.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from llmc.common.errors import LlmcError

CONFIG_VERSION = 1
POLICY_VERSION = 1
KINDS = ("attention", "mlp", "lm_head", "other")
POLICY_SECTIONS = ("default", "attention", "mlp", "lm_head")
SPARSITY_PATTERNS = ("2:4",)
POLICY_DIR = Path(__file__).parent / "policies"


class QuantConfigError(LlmcError, ValueError):
    """A config, scheme name, policy file or stored config a user gave is not valid (one-line message)."""


@dataclass(frozen=True)
class Float8Config:
    activations: bool = True  # W8A8 where the target has FP8 tensor cores; False: always W8A16


@dataclass(frozen=True)
class Int8Config:
    smooth_alpha: float = 0.5  # SmoothQuant migration strength; 0 = round-to-nearest without smoothing

    def __post_init__(self):
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise QuantConfigError(f"Int8Config smooth_alpha {self.smooth_alpha} must be in [0, 1]")


@dataclass(frozen=True)
class Int8WeightOnlyConfig:
    pass


def _check_group(name: str, group_size) -> None:
    if type(group_size) is not int or group_size < 2 or group_size % 2:
        raise QuantConfigError(f"{name} group_size {group_size!r} must be an even whole number >= 2")


@dataclass(frozen=True)
class Int4WeightOnlyConfig:
    group_size: int = 128
    awq: bool = False  # activation-aware scales searched on calibration data

    def __post_init__(self):
        _check_group("Int4WeightOnlyConfig", self.group_size)


@dataclass(frozen=True)
class Int4W4A8Config:
    group_size: int = 128

    def __post_init__(self):
        _check_group("Int4W4A8Config", self.group_size)


CONFIG_TYPES = {cls.__name__: cls for cls in (Float8Config, Int8Config, Int8WeightOnlyConfig, Int4WeightOnlyConfig,
                                                   Int4W4A8Config)}
QuantConfig = Float8Config | Int8Config | Int8WeightOnlyConfig | Int4WeightOnlyConfig | Int4W4A8Config

# --quant names (and policy files' `quant` values) -> config; "mixed" names the shipped policy file instead.
SCHEME_CONFIGS = {
    "fp8": Float8Config(),
    "fp8-w8a16": Float8Config(activations=False),
    "int8": Int8Config(smooth_alpha=0.5),
    "int8-rtn": Int8Config(smooth_alpha=0.0),
    "int8-w8a16": Int8WeightOnlyConfig(),
    "int4": Int4WeightOnlyConfig(),
    "int4-awq": Int4WeightOnlyConfig(awq=True),
    "w4a8": Int4W4A8Config(),
}
SCHEME_NAMES = (*SCHEME_CONFIGS, "mixed")


@dataclass(frozen=True)
class QuantPolicy:
    """rules: layer kind (or "default") -> config, None = keep 16 bits; sparsity: kind (or "default") ->
    pattern, None = dense. A kind absent from a table takes its "default" entry, except lm_head."""

    rules: dict = field(default_factory=dict)
    sparsity: dict = field(default_factory=dict)

    def __post_init__(self):
        keys = (*KINDS, "default")
        for table, what in ((self.rules, "rule"), (self.sparsity, "sparsity")):
            unknown = [k for k in table if k not in keys]
            if unknown:
                raise QuantConfigError(f"QuantPolicy {what} for unknown layer kind {unknown[0]!r}; kinds: "
                                       f"{', '.join(keys)}")
        for kind, config in self.rules.items():
            if config is not None and type(config) not in CONFIG_TYPES.values():
                raise QuantConfigError(f"QuantPolicy rule {kind!r}: {config!r} is not a quantization config")
        for kind, pattern in self.sparsity.items():
            if pattern is not None and pattern not in SPARSITY_PATTERNS:
                raise QuantConfigError(f"QuantPolicy sparsity {kind!r}: {pattern!r}; patterns: "
                                       f"{', '.join(SPARSITY_PATTERNS)} or None")
        for kind in keys:
            # sparsify runs first and turns the GEMM into a sparse one the quantize pass does not touch
            if _lookup(self.rules, kind) is not None and _lookup(self.sparsity, kind) is not None:
                raise QuantConfigError(f"layer kind {kind!r} is given both quantization and sparsity; llmc applies "
                                       "one of them per layer: drop one")

    def config_for(self, kind: str) -> QuantConfig | None:
        return _lookup(self.rules, kind)

    def sparsity_for(self, kind: str) -> str | None:
        return _lookup(self.sparsity, kind)


def _lookup(table: dict, kind: str):
    if kind in table:
        return table[kind]
    return None if kind == "lm_head" else table.get("default")


def as_policy(quant) -> QuantPolicy:
    """A config applies to every GEMM but lm_head; a policy is itself."""
    if isinstance(quant, QuantPolicy):
        return quant
    if type(quant) not in CONFIG_TYPES.values():
        raise QuantConfigError(f"{quant!r} is not a quantization config or QuantPolicy")
    return QuantPolicy({"default": quant})


_ATTENTION_WORDS = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "qkv", "q_k_v")
_MLP_WORDS = ("mlp", "feed_forward", "ffn", "gate_proj", "up_proj", "down_proj", "gate_up", "fc1", "fc2")
_HEAD_WORDS = ("lm_head", "embed_tokens", "wte", "output_weight")


def layer_kind(weight_name: str) -> str:
    """The layer kind of a (flat) weight name; a derived name ("<w>__<gain>") is classified by its source."""
    source = weight_name.replace(".", "_").split("__")[0].lower()
    for kind, words in (("lm_head", _HEAD_WORDS), ("attention", _ATTENTION_WORDS), ("mlp", _MLP_WORDS)):
        if any(word in source for word in words):
            return kind
    return "other"


def config_for_scheme(name: str) -> QuantConfig | QuantPolicy | None:
    """--quant NAME -> a config; "mixed" -> the shipped mixed policy; "none" -> None."""
    if name == "none":
        return None
    if name == "mixed":
        return load_policy(POLICY_DIR / "mixed.toml")
    if name not in SCHEME_CONFIGS:
        raise QuantConfigError(f"unknown quantization scheme {name!r}; use one of {', '.join(SCHEME_NAMES)}")
    return SCHEME_CONFIGS[name]


def load_policy(path: str | Path) -> QuantPolicy:
    """Reads a policy file (see the module docstring); errors name the file and the key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise QuantConfigError(f"cannot read quantization policy {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise QuantConfigError(f"{path}: not valid TOML ({e})") from None
    return policy_from_toml(data, str(path))


def policy_from_toml(data: dict, where: str = "policy") -> QuantPolicy:
    if "version" not in data:
        raise QuantConfigError(f"{where}: missing key 'version'; start the file with version = {POLICY_VERSION}")
    if data["version"] != POLICY_VERSION or type(data["version"]) is not int:
        raise QuantConfigError(f"{where}: version {data['version']!r} is not supported; this llmc reads policy "
                               f"version {POLICY_VERSION}")
    rules, sparsity = {}, {}
    for key, section in data.items():
        if key == "version":
            continue
        if key not in POLICY_SECTIONS:
            raise QuantConfigError(f"{where}: unknown key {key!r}; sections are {', '.join(POLICY_SECTIONS)}")
        if not isinstance(section, dict):
            raise QuantConfigError(f"{where}: {key!r} must be a [{key}] section")
        rules[key], sparsity[key] = _section(section, f"{where}: [{key}]")
    try:
        return QuantPolicy(rules, sparsity)
    except QuantConfigError as e:
        raise QuantConfigError(f"{where}: {e}") from None


def _section(section: dict, where: str) -> tuple[QuantConfig | None, str | None]:
    scheme = section.get("quant", "none")
    if scheme != "none" and scheme not in SCHEME_CONFIGS:
        raise QuantConfigError(f"{where} quant = {scheme!r} is not a scheme; use one of "
                               f"{', '.join(['none', *SCHEME_CONFIGS])}")
    pattern = section.get("sparsity", "none")
    if pattern != "none" and pattern not in SPARSITY_PATTERNS:
        raise QuantConfigError(f"{where} sparsity = {pattern!r}; use one of {', '.join(['none', *SPARSITY_PATTERNS])}")
    config = None if scheme == "none" else SCHEME_CONFIGS[scheme]
    fields = {f.name: f for f in dataclasses.fields(config)} if config is not None else {}
    overrides = {k: v for k, v in section.items() if k not in ("quant", "sparsity")}
    for key, value in overrides.items():
        if key not in fields:
            allowed = ", ".join(["quant", "sparsity", *fields])
            raise QuantConfigError(f"{where} unknown key {key!r} for quant = {scheme!r}; allowed: {allowed}")
        _check_type(getattr(config, key), value, f"{where} {key}")
    if overrides:
        try:
            config = dataclasses.replace(config, **overrides)
        except QuantConfigError as e:
            raise QuantConfigError(f"{where} {e}") from None
    return config, None if pattern == "none" else pattern


def _check_type(default, value, where: str) -> None:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = type(value) is int
    else:
        ok = type(value) in (int, float)
    if not ok:
        raise QuantConfigError(f"{where} = {value!r} must be a {type(default).__name__}")


def config_to_dict(config: QuantConfig | QuantPolicy) -> dict:
    """{"type", "version", fields...}: what the bundle manifest stores; config_from_dict inverts it exactly."""
    if isinstance(config, QuantPolicy):
        rules = {k: None if c is None else config_to_dict(c) for k, c in config.rules.items()}
        return {"type": "QuantPolicy", "version": POLICY_VERSION, "rules": rules, "sparsity": dict(config.sparsity)}
    if type(config) not in CONFIG_TYPES.values():
        raise QuantConfigError(f"{config!r} is not a quantization config")
    return {"type": type(config).__name__, "version": CONFIG_VERSION, **dataclasses.asdict(config)}


def config_from_dict(d: dict) -> QuantConfig | QuantPolicy:
    if not isinstance(d, dict) or "type" not in d:
        raise QuantConfigError(f"stored quantization config {d!r} has no 'type'")
    kind, version = d["type"], d.get("version")
    if kind == "QuantPolicy":
        if version != POLICY_VERSION or set(d) != {"type", "version", "rules", "sparsity"}:
            raise QuantConfigError(f"stored QuantPolicy (version {version!r}, keys {sorted(d)}) is not one this llmc "
                                   f"reads (version {POLICY_VERSION}): recompile the bundle")
        rules = {k: None if c is None else config_from_dict(c) for k, c in d["rules"].items()}
        return QuantPolicy(rules, dict(d["sparsity"]))
    cls = CONFIG_TYPES.get(kind)
    if cls is None:
        raise QuantConfigError(f"unknown quantization config type {kind!r}; known: "
                               f"{', '.join([*CONFIG_TYPES, 'QuantPolicy'])}")
    if version != CONFIG_VERSION:
        raise QuantConfigError(f"{kind} version {version!r} is not supported (this llmc reads {CONFIG_VERSION}): "
                               "recompile the bundle")
    values = {k: v for k, v in d.items() if k not in ("type", "version")}
    names = {f.name for f in dataclasses.fields(cls)}
    if set(values) - names:
        raise QuantConfigError(f"{kind}: unknown field {sorted(set(values) - names)[0]!r}; fields: "
                               f"{', '.join(sorted(names))}")
    return cls(**values)
