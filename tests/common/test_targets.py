import json

import pytest

from llmc.common.targets import (CPU_ISAS, TARGETS, Target, UnknownTargetError, format_targets, get_target, host_isa,
                                 resolve_dtype, targets_with_capability)

CPU_TARGETS = ["cpu", *(f"cpu-{isa}" for isa in CPU_ISAS)]
EXPECTED = {
    **{name: ("cpu", None, None, None) for name in CPU_TARGETS},
    "t4": ("sm_75", (7, 5), 16, 40),
    "a10": ("sm_86", (8, 6), 24, 72),
    "rtx3090": ("sm_86", (8, 6), 24, 82),
    "a100": ("sm_80", (8, 0), 80, 108),
    "l4": ("sm_89", (8, 9), 24, 58),
    "rtx4090": ("sm_89", (8, 9), 24, 128),
    "h100": ("sm_90", (9, 0), 80, 132),
    "h200": ("sm_90", (9, 0), 141, 132),
}


@pytest.mark.parametrize("name", EXPECTED)
def test_every_named_target_has_its_arch_memory_and_sms(name):
    target = get_target(name)
    assert (target.arch, target.capability, target.memory_gb, target.sm_count) == EXPECTED[name]
    assert target.is_gpu == (name not in CPU_TARGETS)
    assert (target.isa is None) == target.is_gpu


def test_registry_holds_exactly_the_named_targets_in_order():
    assert list(TARGETS) == list(EXPECTED)


def test_default_dtypes():
    for name in CPU_TARGETS:  # bf16 where the ISA has bf16 arithmetic
        isa = get_target(name).isa
        assert get_target(name).default_dtype == ("bfloat16" if isa in ("avx512_bf16", "amx") else "float32"), name
    assert get_target("t4").default_dtype == "float16"
    for name in EXPECTED.keys() - {*CPU_TARGETS, "t4"}:
        assert get_target(name).default_dtype == "bfloat16", name


def test_cpu_dtypes():
    cpu = get_target("cpu")
    assert {d for d in ("float32", "bfloat16", "float16", "float8_e4m3fn") if cpu.supports(d)} == {
        "float32", "bfloat16", "float16"}


def test_t4_refuses_bfloat16_and_names_the_fix():
    t4 = get_target("t4")
    assert not t4.supports("bfloat16")
    with pytest.raises(ValueError, match=r"t4 \(sm_75\) has no bfloat16; use --dtype float16"):
        resolve_dtype(t4, "bfloat16")
    with pytest.raises(ValueError, match="has no bfloat16"):
        resolve_dtype(t4, "bf16")


def test_fp8_is_legal_exactly_from_sm_89():
    for target in TARGETS.values():
        expected = target.capability is not None and target.capability >= (8, 9)
        assert target.supports("float8_e4m3fn") == expected, target.name
    assert {t.name for t in TARGETS.values() if t.supports("float8_e4m3fn")} == {"l4", "rtx4090", "h100", "h200"}
    with pytest.raises(ValueError, match=r"a100 \(sm_80\) has no float8_e4m3fn"):
        resolve_dtype(get_target("a100"), "fp8")


def test_resolve_dtype_default_and_aliases():
    h100 = get_target("h100")
    assert resolve_dtype(h100, None) == "bfloat16"
    assert resolve_dtype(h100, "fp16") == "float16"
    assert resolve_dtype(h100, "float8_e4m3fn") == "float8_e4m3fn"
    assert resolve_dtype(get_target("cpu-avx512"), None) == "float32"
    assert resolve_dtype(get_target("cpu-amx"), None) == "bfloat16"
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        resolve_dtype(h100, "int3")


def test_unknown_target_lists_known_names():
    with pytest.raises(UnknownTargetError) as info:
        get_target("v100")
    assert isinstance(info.value, ValueError)
    for name in EXPECTED:
        assert name in str(info.value)
    assert "\n" not in str(info.value)


def test_lookup_ignores_case():
    assert get_target("H100") is TARGETS["h100"]


@pytest.mark.parametrize("name", EXPECTED)
def test_dict_round_trip_through_json(name):
    target = get_target(name)
    again = Target.from_dict(json.loads(json.dumps(target.to_dict())))
    assert again == target
    assert again.capability is None or isinstance(again.capability, tuple)


def test_from_dict_refuses_malformed():
    broken = get_target("a100").to_dict()
    del broken["arch"]
    with pytest.raises(ValueError, match="malformed target"):
        Target.from_dict(broken)
    with pytest.raises(ValueError, match="default dtype"):
        Target("x", "sm_80", (8, 0), 1, 1, ("float16",), "bfloat16")


def test_targets_with_capability():
    assert [t.name for t in targets_with_capability((8, 6))] == ["a10", "rtx3090"]
    assert targets_with_capability((7, 0)) == []


def test_format_targets_lists_every_target_with_its_numbers():
    table = format_targets()
    lines = table.splitlines()
    assert lines[0].split() == ["name", "arch", "memory", "SMs", "dtypes"]
    rows = {line.split()[0]: line for line in lines[1:len(EXPECTED) + 1]}
    assert list(rows) == list(EXPECTED)
    for name, (arch, _, memory, sms) in EXPECTED.items():
        cells = rows[name].split()
        assert cells[1] == (f"cpu/{get_target(name).isa}" if name in CPU_TARGETS else arch)
        if memory is not None:
            assert cells[2:5] == [str(memory), "GB", str(sms)]
    assert "bfloat16" not in rows["t4"]
    assert "float16*" in rows["t4"] and "bfloat16*" in rows["h100"] and "float8_e4m3fn" in rows["h100"]


FLAGS = {"baseline": set(), "avx2": {"avx2", "fma", "sse4_2"}, "avx512": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl"},
         "avx512_bf16": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16"},
         "amx": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16", "amx_tile"}}


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_host_isa_reads_cpu_flags(isa):
    assert host_isa(FLAGS[isa]) == isa
    assert host_isa(FLAGS[isa] | {"sse2", "avx"}) == isa
    if isa != "baseline":  # a flag short of its level drops it below
        assert host_isa(FLAGS[isa] - {sorted(FLAGS[isa] - FLAGS[CPU_ISAS[CPU_ISAS.index(isa) - 1]])[0]}) != isa


def test_cpu_target_is_the_build_machines_instruction_set():
    assert get_target("cpu").isa == host_isa()
    assert get_target("cpu-avx2").isa == "avx2" and get_target("cpu-avx2").arch == "cpu"
