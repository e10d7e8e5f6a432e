"""Errors a user can cause are LlmcErrors (the CLI prints those as one line); each keeps the base its callers catch."""
import importlib

import pytest

from llmc.common.errors import LlmcError, UsageError

# (module, class, the base it had before errors had a type: callers and tests still catch that)
USER_ERRORS = [
    ("llmc.common.contract", "ManifestError", ValueError),
    ("llmc.common.targets", "UnknownTargetError", ValueError),
    ("llmc.models.loader", "CheckpointError", ValueError),
    ("llmc.codegen.graph_io", "GraphFormatError", ValueError),
    ("llmc.codegen.onnx", "OnnxExportError", ValueError),
    ("llmc.codegen.tensorrt", "TensorRTSettingsError", ValueError),
    ("llmc.codegen.triton.plan", "PlanError", ValueError),
    ("llmc.passes.calibrate", "CalibrationError", ValueError),
    ("llmc.passes.quant_config", "QuantConfigError", ValueError),
    ("llmc.compiler.artifact", "BundleWriteError", ValueError),
    ("llmc.compiler.pipeline", "UnknownPassError", ValueError),
    ("llmc.compiler.pipeline", "PassCheckError", ValueError),
    ("llmc.runtime.bundle", "BundleError", Exception),
    ("llmc.runtime.tensorrt", "TensorRTError", Exception),
    ("llmc.runtime.kernels", "KernelError", Exception),
    ("llmc.runtime.engine", "PromptTooLongError", ValueError),
    ("llmc.runtime.kv_cache", "CacheFullError", RuntimeError),
]


@pytest.mark.parametrize("module, name, base", USER_ERRORS, ids=[name for _, name, _ in USER_ERRORS])
def test_user_errors_are_llmc_errors_and_keep_their_base(module, name, base):
    error = getattr(importlib.import_module(module), name)
    assert issubclass(error, LlmcError) and issubclass(error, base)


def test_a_usage_error_is_still_a_value_error():
    with pytest.raises(ValueError, match="--max-seq-len"):
        raise UsageError("--max-seq-len must be at least 1")
    assert not issubclass(ValueError, LlmcError)  # a plain ValueError is a bug, not a user's error


def test_option_and_load_refusals_are_usage_errors():
    from llmc.common.targets import get_target, resolve_dtype
    from llmc.passes.options import CompileOptions
    from llmc.runtime.kv_cache import parse_memory_size

    with pytest.raises(UsageError, match="--max-seq-len must be at least 1"):
        CompileOptions(max_seq_len=0)
    with pytest.raises(UsageError, match="has no bfloat16"):
        resolve_dtype(get_target("t4"), "bfloat16")
    with pytest.raises(UsageError, match="cannot read memory size"):
        parse_memory_size("two gigs")
