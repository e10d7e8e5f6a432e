import pytest
import torch

from llmc.codegen.triton.configs import (ARCHS, SHARED_MEMORY, Config, autotune, candidates, fit_shared_memory,
                                         pick, shape_class, tuning_key)

OPS = ["rms_norm", "add_rms_norm", "norm_linear", "add_norm_linear", "rope"]


def test_decode_and_prefill_shape_classes():
    assert shape_class(1) == shape_class(16) == "decode"
    assert shape_class(17) == "prefill"
    decode, prefill = pick("norm_linear", "sm_90", 1, 4096, 4096), pick("norm_linear", "sm_90", 512, 4096, 4096)
    assert decode.block_m == 16 and prefill.block_m > decode.block_m


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_config_on_every_arch(op, arch):
    for m in (1, 1000):
        for epilogue in ("none", "swiglu"):
            config = pick(op, arch, m, 4096, 4096, epilogue)
            assert config.num_warps >= 1
            if arch in SHARED_MEMORY and op.endswith("norm_linear"):
                tiles = 2 if epilogue == "swiglu" else 1
                assert fit_shared_memory(config, arch, 2, tiles) == config, "table entries must fit 16-bit tiles"


def test_swiglu_tiles_are_narrower():
    assert pick("norm_linear", "sm_80", 512, 1, 1, "swiglu").block_n < pick("norm_linear", "sm_80", 512, 1, 1).block_n


def test_float32_tiles_shrink_to_fit_shared_memory():
    config = pick("norm_linear", "sm_90", 1, 4096, 4096, "swiglu")
    fitted = fit_shared_memory(config, "sm_90", 4, weight_tiles=2)
    used = (fitted.block_m + 2 * fitted.block_n) * fitted.block_k * 4 * fitted.num_stages
    assert fitted != config and used <= SHARED_MEMORY["sm_90"]
    assert fit_shared_memory(config, "interpret", 4) == config


def test_a_tuned_choice_wins_for_its_shape_class_only():
    tuned = {tuning_key("norm_linear", "sm_90", 4, 4096, 4096): {"config": Config(16, 128, 64, 4, 3).to_dict(),
                                                                 "ms": 0.01}}
    assert pick("norm_linear", "sm_90", 1, 4096, 4096, tuned=tuned) == Config(16, 128, 64, 4, 3)
    assert pick("norm_linear", "sm_90", 1, 4096, 1024, tuned=tuned) == pick("norm_linear", "sm_90", 1, 4096, 1024)
    assert pick("norm_linear", "sm_90", 64, 4096, 4096, tuned=tuned) == pick("norm_linear", "sm_90", 64, 4096, 4096)


def test_candidates_start_with_the_table_choice_and_are_distinct():
    for op in OPS:
        options = candidates(op, "sm_80", 1)
        assert options[0] == pick(op, "sm_80", 1, 0) and len(options) == len(set(options)) > 1


def test_unknown_arch_and_op_are_refused():
    with pytest.raises(ValueError, match="arch 'sm_70'"):
        pick("rms_norm", "sm_70", 1, 128)
    with pytest.raises(ValueError, match="op 'softmax'"):
        pick("softmax", "sm_80", 1, 128)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a host without CUDA")
def test_autotune_needs_a_gpu():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        autotune("rms_norm", "sm_90", {"m": 1, "n": 4096})


@pytest.mark.gpu
def test_autotune_records_the_fastest_candidate(device, monkeypatch):
    if device.type != "cuda":
        pytest.skip("autotuning times kernels on a GPU")
    from llmc.codegen.triton.launch import current_arch

    arch = current_arch(device)
    record = {}
    shapes = {"m": 8, "n": 1024, "k": 1024}
    best = autotune("norm_linear", arch, shapes, candidates("norm_linear", arch, 8)[:4], record=record, norm="rms")
    assert record[tuning_key("norm_linear", arch, 8, 1024, 1024)]["config"] == best.to_dict()
    assert pick("norm_linear", arch, 8, 1024, 1024, tuned=record) == best
