"""CompileOptions (passes/options.py): every option validated once, on construction, with the flag named; the
command line's spellings resolved by from_flags; the manifest round trip bind relies on; llmc.compile takes
either the options or their keywords."""
import pytest

import llmc
from llmc.passes.options import CompileOptions
from llmc.passes.pattern import PassContext
from llmc.passes.quant_config import Int4WeightOnlyConfig, Int8Config, QuantPolicy
from llmc.passes.sparsify import SparsityConfig


@pytest.mark.parametrize("options,message", [
    ({"max_seq_len": 0}, "--max-seq-len must be at least 1, got 0"),
    ({"sliding_window": -1}, r"--sliding-window must be a whole number >= 0"),
    ({"sliding_window": 1.5}, r"--sliding-window must be a whole number >= 0"),
    ({"sliding_window": 8, "check_passes": True}, "use one or the other"),
    ({"backend": "tvm"}, "unknown --backend 'tvm'; one of triton, onnx, tensorrt"),
    ({"attention_keep": 1.5}, r"--attention-keep must be in \[0, 1\]"),
    ({"attention_block": 0}, "--attention-block must be at least 1"),
    ({"quant": Int8Config(), "check_passes": True}, "judge them with llmc eval"),
    ({"attention_keep": 0.5, "check_passes": True}, "judge them with llmc eval"),
])
def test_each_bad_option_is_refused_naming_its_flag(options, message):
    with pytest.raises(ValueError, match=message):
        CompileOptions(**options)


@pytest.mark.parametrize("flags,message", [
    ({"quant": "int4", "quant_policy": "p.toml"}, "not both"),
    ({"quant": "fp8", "quant_group_size": 64}, "--quant-group-size applies to the int4 schemes"),
    ({"sparsity": "4:8"}, "--sparsity '4:8' is not supported"),
    ({"sparsity": "2:4", "quant": "int4"}, "would claim the same layers"),
])
def test_bad_flag_combinations_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        CompileOptions.from_flags(**flags)


def test_from_flags_resolves_the_spellings():
    options = CompileOptions.from_flags(target="a100", quant="int4", quant_group_size=64)
    assert options.target == "a100" and options.quant == Int4WeightOnlyConfig(64) and options.lossy
    assert CompileOptions.from_flags(sparsity="2:4").sparsity == SparsityConfig(method="magnitude")
    assert CompileOptions.from_flags(sparsity="2:4", calibration="c.txt").sparsity.method == "wanda"
    mixed = CompileOptions.from_flags(quant="mixed", quant_group_size=32).quant
    assert isinstance(mixed, QuantPolicy) and {getattr(c, "group_size", 32) for c in mixed.rules.values()} == {32}
    assert not CompileOptions().lossy
    with pytest.raises(TypeError, match="unknown compile option 'quantize'"):
        CompileOptions.from_flags(quantize="int4")


def test_the_cli_flags_are_the_options():
    from llmc.cli import parser

    args = parser().parse_args(["compile", "llmc-tiny", "--target", "cpu"])
    assert all(hasattr(args, name) for name in CompileOptions.flag_names())


def test_manifest_round_trip_keeps_what_changes_the_function():
    options = CompileOptions.from_flags(target="cpu", dtype="float32", max_seq_len=96, sliding_window=32,
                                        quant="int4", attention_keep=0.5, attention_block=16)
    manifest = {"target": {"name": "cpu"}, "dtype": "float32", "max_seq_len": 96, **options.to_manifest()}
    back = CompileOptions.from_manifest(manifest)
    assert back == options


def test_the_pass_context_reads_the_options():
    ctx = PassContext(options=CompileOptions(sliding_window=8, attention_keep=0.25, attention_block=16))
    assert (ctx.sliding_window, ctx.attention_keep, ctx.attention_block, ctx.quant, ctx.sparsity) == (8, 0.25, 16,
                                                                                                        None, None)
    assert PassContext().options == CompileOptions()


def test_compile_takes_options_or_keywords_not_both(tmp_path):
    with pytest.raises(TypeError, match="not both"):
        llmc.compile("llmc-tiny", "cpu", tmp_path / "b.llmc", options=CompileOptions())
    with pytest.raises(TypeError, match="not both"):
        llmc.compile("llmc-tiny", out=tmp_path / "b.llmc", options=CompileOptions(), dtype="float32")
    assert not (tmp_path / "b.llmc").exists()
    assert llmc.CompileOptions is CompileOptions


def test_compile_with_options_alone_builds_what_they_say(tmp_path):
    options = CompileOptions.from_flags(dtype="float32", max_seq_len=64, sliding_window=8)
    bundle = llmc.load(llmc.compile("llmc-tiny", out=tmp_path / "b.llmc", options=options))
    assert bundle.max_seq_len == 64 and bundle.bundle.dtype == "float32"
    assert bundle.bundle.manifest["sliding_window"] == 8 and bundle.bundle.target["name"] == "cpu"
