"""CompileOptions: every option of a compile, validated once, wherever the compile starts.

`llmc compile` (llmc/cli.py) and `llmc.compile(**flags)` both build one with `CompileOptions.from_flags` (user
spellings: a scheme name or a policy file for quantization, "2:4" for sparsity, a group size); the compiler holds it,
the pass context carries it to every pass (PassContext.options), the options that change the computed function go
into the manifest (`to_manifest`) and `llmc bind` reads them back (`from_manifest`) to replay the compile. It lives
beside the passes because the passes read it and the compiler sits above them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from llmc.common.contract import BACKENDS
from llmc.common.errors import UsageError


@dataclass(frozen=True)
class CompileOptions:
    """What a compile does beyond the model: validated on construction (ValueError naming the flag)."""

    target: str = "cpu"
    dtype: str | None = None  # None: the target's default
    passes: str | list[str] | None = None  # --passes: names, "-name" exclusions; None: the default pipeline
    max_seq_len: int | None = None  # None: the model's, capped by the compiler's default
    check_passes: bool = False  # run every pass's graph against the unpassed one
    sliding_window: int = 0  # N > 0: every attention sees only the last N positions (block_attention)
    backend: str = "triton"  # triton (graph.json + Triton kernels) | onnx | tensorrt
    quant: object = None  # passes/quant_config.py config or QuantPolicy; None = none
    sparsity: object = None  # passes/sparsify.py SparsityConfig; None = none
    attention_keep: float = 0.0  # block-sparse attention: fraction of key blocks kept per query block; 0 = dense
    attention_block: int = 64
    calibration: str | Path | None = None  # text file for calibration-aware quantization and pruning
    # --dump-after PHASE DIR: each graph as readable text after a phase (or a pass) into DIR; changes nothing.
    dump_after: tuple[str, str] | None = None

    def __post_init__(self):
        if self.max_seq_len is not None and (not isinstance(self.max_seq_len, int) or self.max_seq_len < 1):
            raise UsageError(f"--max-seq-len must be at least 1, got {self.max_seq_len}")
        if not isinstance(self.sliding_window, int) or self.sliding_window < 0:
            raise UsageError(f"--sliding-window must be a whole number >= 0 (0 = full attention), "
                             f"got {self.sliding_window!r}")
        if self.sliding_window and self.check_passes:
            raise UsageError("--check-passes compares with the unpassed full-attention graphs, which "
                             "--sliding-window changes on purpose: use one or the other")
        if self.backend not in BACKENDS:
            raise UsageError(f"unknown --backend {self.backend!r}; one of {', '.join(BACKENDS)}")
        if not 0.0 <= self.attention_keep <= 1.0:
            raise UsageError(f"--attention-keep must be in [0, 1] (0 or 1 = dense attention), "
                             f"got {self.attention_keep}")
        if self.attention_block < 1:
            raise UsageError(f"--attention-block must be at least 1, got {self.attention_block}")
        if self.dump_after is not None:
            if len(self.dump_after) != 2 or not all(self.dump_after):
                raise UsageError(f"--dump-after takes a phase (or a pass) and a directory, got {self.dump_after!r}")
            object.__setattr__(self, "dump_after", tuple(str(v) for v in self.dump_after))
        if self.lossy and self.check_passes:
            raise UsageError("--check-passes compares every pass with the unpassed graph at rounding tolerance, "
                             "which quantization and sparsity exceed on purpose: judge them with llmc eval instead")

    @classmethod
    def from_flags(cls, *, quant: str | None = None, quant_policy: str | Path | None = None,
                   quant_group_size: int | None = None, sparsity: str | None = None, **options) -> CompileOptions:
        """The options from the command line's spellings: --quant SCHEME or --quant-policy FILE (with
        --quant-group-size), --sparsity 2:4; every other keyword is a field."""
        from llmc.passes.quant_config import QuantPolicy, config_for_scheme, load_policy
        from llmc.passes.sparsify import SparsityConfig

        unknown = sorted(set(options) - set(cls.flag_names()))
        if unknown:
            raise TypeError(f"unknown compile option {unknown[0]!r}")
        if quant is not None and quant_policy is not None:
            raise UsageError("give --quant SCHEME or --quant-policy FILE, not both (a policy names its schemes)")
        config = load_policy(quant_policy) if quant_policy is not None else config_for_scheme(quant) if quant else None
        if quant_group_size is not None:
            config = _with_group_size(config, quant_group_size)
        method = "wanda" if options.get("calibration") else "magnitude"  # calibration-aware pruning when calibrated
        sparse = SparsityConfig.from_policy(config, method) if isinstance(config, QuantPolicy) else None
        if sparsity not in (None, "none"):
            if sparsity != "2:4":
                raise UsageError(f"--sparsity {sparsity!r} is not supported; the one structured pattern is 2:4")
            if quant is not None:
                raise UsageError("--sparsity 2:4 and --quant would claim the same layers (llmc applies one per "
                                 "layer): give a --quant-policy naming which layer kinds get which")
            sparse = sparse or SparsityConfig(method=method)
        return cls(quant=config, sparsity=sparse, **options)

    @classmethod
    def flag_names(cls) -> list[str]:
        """The keywords from_flags takes: `llmc compile`'s option flags, by their argparse names."""
        fields = [f.name for f in dataclasses.fields(cls) if f.name not in ("quant", "sparsity")]
        return [*fields, "quant", "quant_policy", "quant_group_size", "sparsity"]

    @property
    def lossy(self) -> bool:
        """Whether the options change the function on purpose (quantization, sparsity, block-sparse attention)."""
        return self.quant is not None or self.sparsity is not None or 0 < self.attention_keep < 1

    def check_pass_names(self, names: list[str]) -> None:
        """The options a pass applies need that pass in the pipeline."""
        if self.sliding_window and "block_attention" not in names:
            raise UsageError("--sliding-window is applied by the block_attention pass: do not exclude it with --passes")
        if 0 < self.attention_keep < 1 and "block_attention" not in names:
            raise UsageError("--attention-keep is applied by the block_attention pass: do not exclude it with --passes")

    def to_manifest(self) -> dict:
        """The options that change the computed function, as the manifest records them."""
        from llmc.passes.quant_config import config_to_dict

        return {"sliding_window": self.sliding_window, "backend": self.backend,
                "quant": config_to_dict(self.quant) if self.quant is not None else None,
                "sparsity": self.sparsity.to_dict() if self.sparsity is not None else None,
                "attention_sparsity": ({"keep": self.attention_keep, "block": self.attention_block}
                                       if 0 < self.attention_keep < 1 else None)}

    @classmethod
    def from_manifest(cls, manifest: dict) -> CompileOptions:
        """The options a bundle was compiled with (its manifest, as to_manifest and the compiler wrote it)."""
        from llmc.passes.quant_config import config_from_dict
        from llmc.passes.sparsify import SparsityConfig

        attention = manifest.get("attention_sparsity") or {}
        return cls(target=manifest["target"]["name"], dtype=manifest["dtype"], max_seq_len=manifest["max_seq_len"],
                   sliding_window=manifest.get("sliding_window", 0), backend=manifest.get("backend", "triton"),
                   quant=config_from_dict(manifest["quant"]) if manifest.get("quant") else None,
                   sparsity=SparsityConfig.from_dict(manifest["sparsity"]) if manifest.get("sparsity") else None,
                   attention_keep=attention.get("keep", 0.0), attention_block=attention.get("block", 64))


def _with_group_size(config, group_size: int):
    """config (or every rule of a policy) with int4 groups of group_size."""
    from llmc.passes.quant_config import Int4W4A8Config, Int4WeightOnlyConfig, QuantPolicy

    int4 = (Int4WeightOnlyConfig, Int4W4A8Config)  # the configs with a group size

    if isinstance(config, QuantPolicy):
        if not any(isinstance(c, int4) for c in config.rules.values()):
            raise UsageError("--quant-group-size: this policy has no int4 rule to apply it to")
        rules = {kind: _with_group_size(c, group_size) if isinstance(c, int4) else c
                 for kind, c in config.rules.items()}
        return dataclasses.replace(config, rules=rules)
    if not isinstance(config, int4):
        raise UsageError("--quant-group-size applies to the int4 schemes (int4, int4-awq, w4a8, mixed)")
    return dataclasses.replace(config, group_size=group_size)
