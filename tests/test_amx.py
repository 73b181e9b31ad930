"""AMX int8 in TIR (fgq_tvm/schedules/intrinsics_amx.py) and the measured AMX peak of bench.

Here, on any x86 CPU: the tile configuration, the NumPy reference of ``tdpbusd``, the code
LLVM makes of the intrinsics, and the reasons the peak is not measured. The products
themselves run only where the CPU has AMX (the other tests skip with a reason there).
"""

from __future__ import annotations

import collections
import errno
import re

import numpy as np
import pytest
import tvm

from fgq_tvm.bench.amx_peak import (
    ITERATIONS,
    _exact,
    amx_peak_kernel,
    amx_unavailable,
    measure_amx_peak,
)
from fgq_tvm.cpu_features import host_has, request_amx_tile_data
from fgq_tvm.schedules import intrinsics_amx
from fgq_tvm.schedules.intrinsics_amx import dot_reference, tile_configuration
from fgq_tvm.target import host_target, parse_target

AMX_TARGET = parse_target("llvm -mcpu=sapphirerapids")
HAS_AMX = host_has("amx_tile", "amx_int8")
needs_amx = pytest.mark.skipif(not HAS_AMX, reason="this CPU has no AMX int8 (amx_int8)")
INSTRUCTION = re.compile(
    r"^\s+(ldtilecfg|tilezero|tileloadd|tdpbusd|tilestored|tilerelease)\b(.*)$", re.M
)


def test_the_configuration_shapes_eight_full_tiles():
    config = tile_configuration()
    assert config.dtype == np.uint8 and config.shape == (64,)
    assert config[0] == 1  # palette 1
    column_bytes = config[16:32].view("<u2")
    assert list(column_bytes) == [64] * 8 and list(config[48:56]) == [16] * 8
    assert not config[1:16].any() and not config[56:].any()


def test_the_reference_reads_weights_in_words_of_four():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 64), dtype=np.uint8)
    b = rng.integers(-128, 128, (16, 64), dtype=np.int8)
    expected = np.zeros((16, 16), np.int64)
    for m in range(16):
        for n in range(16):
            expected[m, n] = sum(int(a[m, k]) * int(b[k // 4, 4 * n + k % 4]) for k in range(64))
    np.testing.assert_array_equal(dot_reference(a, b), expected)


def test_the_peak_kernel_is_four_products_per_round_on_each_thread():
    built = tvm.compile(tvm.IRModule({"amx_peak": amx_peak_kernel(2, 3)}), AMX_TARGET)
    found = INSTRUCTION.findall(built.mod.inspect_source("s"))
    counts = collections.Counter(name for name, _ in found)
    assert counts == {"ldtilecfg": 1, "tilezero": 4, "tileloadd": 4, "tdpbusd": 12,
                      "tilestored": 4, "tilerelease": 1}  # fmt: skip
    products = {operands.strip() for name, operands in found if name == "tdpbusd"}
    # AT&T order: weights, activations, accumulator
    assert products == {
        "%tmm6, %tmm4, %tmm0", "%tmm7, %tmm4, %tmm1", "%tmm6, %tmm5, %tmm2", "%tmm7, %tmm5, %tmm3"
    }  # fmt: skip


def test_tile_numbers_are_those_of_the_eight_tiles():
    with pytest.raises(ValueError, match="tiles 0 to 7, not 8"):
        intrinsics_amx.dot_tiles(8, 4, 6)


def test_wrong_products_are_no_peak():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 3, (2, 16, 64), dtype=np.uint8)
    b = rng.integers(-1, 2, (2, 16, 64), dtype=np.int8)
    c = np.stack([5 * dot_reference(a[j // 2], b[j % 2]) for j in range(4)])[None].repeat(2, 0)
    assert _exact(c, a, b, 5)
    c[1, 3, 15, 15] += 1
    assert not _exact(c, a, b, 5)


def test_the_peak_says_why_it_was_not_measured():
    assert amx_unavailable(parse_target("llvm -mcpu=icelake-server")) == (
        "the target has no AMX int8"
    )
    peak, why = measure_amx_peak(parse_target("llvm -mcpu=znver4"), 2, 3)
    assert peak is None and why == "not measured: the target has no AMX int8"
    if not HAS_AMX:
        assert amx_unavailable(AMX_TARGET) == "this CPU has no AMX int8"


@pytest.mark.skipif(HAS_AMX, reason="this CPU has AMX")
def test_linux_refuses_the_tile_state_to_a_cpu_without_amx():
    with pytest.raises(OSError) as error:
        request_amx_tile_data()
    assert error.value.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)
    assert "ARCH_REQ_XCOMP_PERM" in str(error.value) or error.value.errno == errno.ENOSYS


@needs_amx
def test_the_peak_kernel_multiplies_exactly_and_reports_a_rate():
    request_amx_tile_data()
    target = parse_target(host_target())
    peak, how = measure_amx_peak(target, 2, 3, iterations=ITERATIONS // 100)
    assert how.startswith("measured (tdpbusd into 4 tiles on 2 threads"), how
    assert peak > 0
