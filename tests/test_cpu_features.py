"""Tests of :mod:`fgq_tvm.cpu_features`: the host's facts from ``/proc/cpuinfo`` text, a target's
extensions as LLVM sees them and as the tables of :mod:`fgq_tvm.x86_tables` read them without
LLVM (the same), the extensions a host lacks, and the int8 peak."""

import subprocess
import sys

import pytest
from tvm.target import Target

from fgq_tvm import cpu_features, x86_tables
from fgq_tvm.target import parse_target

CPUINFO = """processor\t: 0
model name\t: Example CPU @ 2.00GHz
cpu MHz\t\t: 2000.000
flags\t\t: fpu sse4_1 sse4_2 avx avx2 avx512f avx512_vnni
processor\t: 1
model name\t: Example CPU @ 2.00GHz
cpu MHz\t\t: 3500.500
flags\t\t: fpu
"""
SAPPHIRE_RAPIDS = parse_target("llvm -mcpu=sapphirerapids")


def test_module_imports_no_tvm():
    code = "import sys, fgq_tvm.cpu_features; assert 'tvm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_clock_and_cpu_name_from_cpuinfo():
    assert cpu_features.cpu_ghz(CPUINFO) == pytest.approx(3.5005)
    assert cpu_features.cpu_ghz("processor: 0\n") is None
    assert cpu_features.cpu_name(CPUINFO) == "Example CPU @ 2.00GHz"


def test_read_cpuinfo_of_a_missing_file(tmp_path):
    assert cpu_features.read_cpuinfo(tmp_path / "none") == ""


def test_host_flags_are_the_first_flags_line(monkeypatch):
    monkeypatch.setattr(cpu_features, "read_cpuinfo", lambda: CPUINFO)
    flags = {"fpu", "sse4_1", "sse4_2", "avx", "avx2", "avx512f", "avx512_vnni"}
    assert cpu_features.host_flags() == flags
    assert cpu_features.host_has("avx2", "avx512_vnni")
    assert not cpu_features.host_has("avx2", "amx_int8")
    monkeypatch.setattr(cpu_features, "read_cpuinfo", lambda: "")
    assert cpu_features.host_flags() is None
    assert not cpu_features.host_has("avx2")


def test_target_has_asks_llvm():
    assert cpu_features.target_has(SAPPHIRE_RAPIDS, "avx512vnni", "amx-tile", "amx-int8")
    assert not cpu_features.target_has(parse_target("llvm -mcpu=znver4"), "amx-int8")
    assert cpu_features.target_has(parse_target("llvm -mcpu=znver4"), "avx512vpopcntdq")
    assert not cpu_features.target_has(parse_target("llvm -mcpu=haswell"), "avx2", "avx512vnni")
    assert cpu_features.target_has(
        parse_target("llvm -mcpu=haswell -mattr=+avx512vnni"), "avx512vnni"
    )
    assert not cpu_features.target_has(None, "avx2")


def test_a_host_without_amx_lacks_what_an_amx_target_may_use():
    all_but_amx = {flag for flag in cpu_features.X86_EXTENSIONS.values() if "amx" not in flag}
    sapphire_rapids = {"kind": "llvm", "mcpu": "sapphirerapids"}
    missing = cpu_features.missing_extensions(sapphire_rapids, all_but_amx)
    assert missing == ["amx-tile", "amx-int8"]
    everything = set(cpu_features.X86_EXTENSIONS.values())
    assert cpu_features.missing_extensions(sapphire_rapids, everything) == []
    assert cpu_features.missing_extensions({"kind": "llvm"}, set()) == []  # generic x86-64


def test_x86_tables_are_what_llvm_says():
    # after an upgrade of TVM: python -c "import fgq_tvm.cpu_features as c; c.write_x86_tables()"
    tables = {"CPUS": x86_tables.CPUS, "ENABLES": x86_tables.ENABLES}
    assert cpu_features.llvm_x86_tables() == {**tables, "DISABLES": x86_tables.DISABLES}


MATTRS = [
    ("skylake", ["+avx512vnni"]),
    ("cascadelake", ["-avx512f"]),
    ("cascadelake", ["-avx512f", "+avx512bw"]),
    ("znver4", ["-avx2", "+fma"]),
    ("znver4", ["avx512vnni"]),  # no sign: LLVM disables it
    ("sapphirerapids", ["-amx-tile"]),
    ("sapphirerapids", ["-sse4.2", "+gfni"]),
    (None, ["+avx2", "+fma"]),
    (None, ["+avx10.1-512"]),
    ("haswell", ["+amx-int8", "-ssse3", "+sse4a"]),
    ("x86-64-v3", ["+nonexistent-feature"]),
]


def llvm_enables(mcpu: str | None, mattr: list[str]) -> tuple[dict, list[str]]:
    """An x86 target config and the extensions LLVM says its code may use."""
    config = {"kind": "llvm", "mtriple": cpu_features.X86_TRIPLE, "mattr": mattr}
    config |= {"mcpu": mcpu} if mcpu else {}
    target = Target(config)
    return config, [
        name for name in cpu_features.X86_EXTENSIONS if cpu_features.target_has(target, name)
    ]


def test_compiled_extensions_of_every_cpu_are_those_llvm_enables():
    for mcpu in sorted(cpu_features._cpu_extensions()):
        config, expected = llvm_enables(mcpu, [])
        assert cpu_features.compiled_extensions(config) == expected, mcpu


@pytest.mark.parametrize(("mcpu", "mattr"), MATTRS)
def test_compiled_extensions_with_mattr_are_those_llvm_enables(mcpu, mattr):
    config, expected = llvm_enables(mcpu, mattr)
    assert cpu_features.compiled_extensions(config) == expected


def test_compiled_extensions_of_other_targets():
    with pytest.raises(ValueError, match="names CPU 'nonexistent', which LLVM does not know"):
        cpu_features.compiled_extensions({"kind": "llvm", "mcpu": "nonexistent"})
    arm = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-v1"}
    assert cpu_features.compiled_extensions(arm) == []  # no x86 extensions to check


def test_vnni_peak():
    assert cpu_features.vnni_peak_gmacs(2.3, 2) == pytest.approx(64 * 2 * 2.3)
    assert cpu_features.vnni_macs_per_cycle(parse_target("llvm -mcpu=znver4")) == 64
    assert cpu_features.vnni_macs_per_cycle(parse_target("llvm -mcpu=emeraldrapids")) == 128
    assert cpu_features.vnni_macs_per_cycle(parse_target("llvm")) == 64
