import pytest
import torch

from llmc.codegen.triton import configs
from llmc.codegen.triton.configs import (ARCHS, SHARED_MEMORY, Config, autotune, candidates, fit_shared_memory,
                                         pick, shape_class, tuning_key)

OPS = ["rms_norm", "add_rms_norm", "norm_linear", "add_norm_linear", "rope", "rope_write_kv"]


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


GPU_ARCHS = [arch for arch in ARCHS if arch in SHARED_MEMORY]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_attention_has_a_fitting_config_for_every_head_dim_and_length(arch, kind):
    for head_dim in (10, 64, 80, 128, 256):
        padded = next(d for d in configs.HEAD_DIM_BUCKETS if head_dim <= d)
        for tokens in (1, 16, 17, 512, 513, 4096, 32768, 131072):
            table = configs._ATTENTION[kind][arch][padded][configs.attention_bucket(kind, tokens)]
            config = configs.pick_attention(kind, arch, head_dim, tokens)
            if arch in SHARED_MEMORY:
                assert config == table, "table entries must fit 16-bit tiles as written"
                wide = configs.pick_attention(kind, arch, head_dim, tokens, element_bytes=4)
                assert configs.attention_shared_bytes(wide, padded, 4, kind) <= SHARED_MEMORY[arch]
            for block in (config.block_n, config.block_m) if kind == "prefill" else (config.block_n,):
                assert block >= 16 and block & (block - 1) == 0, "tl.dot tiles: powers of two, at least 16"


@pytest.mark.parametrize("arch", GPU_ARCHS)
def test_prefill_tiles_grow_with_the_prompt(arch):
    for head_dim in configs.HEAD_DIM_BUCKETS:
        tiny, short, long = (configs.pick_attention("prefill", arch, head_dim, tokens) for tokens in (8, 300, 4096))
        assert tiny.block_m == 16 and tiny.block_m < short.block_m <= long.block_m
        assert tiny.block_m * tiny.block_n < long.block_m * long.block_n


def test_decode_chunks_span_64_to_512_keys():
    chunks = [configs.pick_attention("decode", "sm_90", 128, context).block_k for context in (1024, 8192, 32768)]
    assert chunks == [64, 256, 512]
    assert sorted(configs.DECODE_CHUNK.values()) == [64, 256, 512]


@pytest.mark.parametrize("arch", GPU_ARCHS)
def test_one_long_sequence_fills_the_gpu(arch):
    sms = configs.SM_COUNT[arch]
    config = configs.pick_attention("decode", arch, 128, 32768)
    splits = configs.decode_splits(1, 8, 32768, sms, config)
    assert 8 * splits >= sms, "one 32K-token sequence with 8 kv heads gives every SM a program"
    assert 32768 / splits >= config.block_k, "no split below the table's chunk of keys"
    assert configs.decode_splits(64, 8, 32768, sms, config) == 1, "a large batch fills the GPU without splitting"
    assert configs.decode_splits(1, 8, 100, sms, configs.pick_attention("decode", arch, 128, 100)) == 2


def test_attention_plan_sizes_reach_every_prefill_bucket():
    sizes = configs.attention_plan_sizes()
    assert {configs.attention_bucket("prefill", size) for size in sizes.values()} == {
        name for name, _ in configs.PREFILL_BUCKETS}
    assert min(sizes.values()) > 1, "S = 1 is decode"


def test_attention_ops_are_not_in_the_gemm_table():
    with pytest.raises(ValueError, match="pick_attention"):
        pick("paged_attention", "sm_80", 1, 128)
