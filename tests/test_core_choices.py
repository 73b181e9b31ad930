"""Per-layer core choice by measurement (fgq_tvm/core_choices.py, select.select_core's
``measured``, tuning.measure_cores): cores that could take one another's place are timed, and
compile puts a layer on the fastest.

No two registered cores can take each other's place on one CPU yet (the AMX core is not
registered, and the AVX2 core stands aside where VNNI is): the AMX core with emulated tiles,
first in the list, plays the part beside the host's dot core.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import tvm
from helpers import EmulatedAmxCore, kernel_call
from tvm import relax

from fgq_tvm.config import LayerConfig
from fgq_tvm.core_choices import CHOICES, CoreTimes, append_core_times, load_core_choices
from fgq_tvm.quant.layers import ActQuant, QuantizedLayer
from fgq_tvm.relax_passes import LegalizeQuantizedLayers
from fgq_tvm.schedules import select
from fgq_tvm.schedules.conv2d_dot import AVX2_CORE, VNNI_CORE
from fgq_tvm.schedules.core import Conv2dShape, Epilogue
from fgq_tvm.schedules.kernel_spec import KernelSpec
from fgq_tvm.schedules.layout import BLOCKED
from fgq_tvm.target import host_target, parse_target
from fgq_tvm.tuning import KernelTask, TunedSchedules, kernel_tasks, tune

RNG = np.random.default_rng(3)
LAYER = QuantizedLayer(
    name="conv",
    op="conv2d",
    config=LayerConfig("int8", 64),
    act=ActQuant(0.05, 8, signed=False),
    weight=RNG.integers(-127, 128, (64, 64, 3, 3)).astype(np.int8),
    group_size=64,
    bias=RNG.normal(size=64).astype(np.float32),
    channel_scale=RNG.uniform(0.001, 0.01, 64).astype(np.float32),
    padding=(1, 1),
)
SHAPE = Conv2dShape(1, 64, 8, 8, 64, (3, 3), padding=(1, 1), group_size=64)
KEY = select.layer_key(SHAPE, LAYER.act, "int8")
CASCADELAKE = parse_target("llvm -mcpu=cascadelake")
HOST = parse_target(host_target())
EMULATED = EmulatedAmxCore()


@pytest.fixture
def emulated_amx_first(monkeypatch):
    monkeypatch.setattr(select, "CORES", (EMULATED, *select.CORES))


def test_a_measured_core_computes_the_layer_where_it_can_take_the_first_ones_place():
    cores = (EMULATED, VNNI_CORE, AVX2_CORE, select.core_named("bitplane"))
    # AVX2 stands aside where VNNI is; bitplane computes in NCHW, from floats
    names = select.interchangeable_cores(SHAPE, LAYER.act, "int8", CASCADELAKE, cores)
    assert names == [EMULATED.name, VNNI_CORE.name]

    def chosen(measured):
        return select.select_core(SHAPE, LAYER.act, "int8", CASCADELAKE, cores, measured)

    assert chosen(None) == EMULATED.name
    assert chosen({KEY: VNNI_CORE.name}) == VNNI_CORE.name
    for elsewhere in ("bitplane", AVX2_CORE.name, "no-such-core"):
        assert chosen({KEY: elsewhere}) == EMULATED.name
    other_layer = select.layer_key(SHAPE, ActQuant(0.05, 4, signed=False), "int8")
    assert chosen({other_layer: VNNI_CORE.name}) == EMULATED.name


def test_the_latest_measurement_of_a_layer_decides_and_unreadable_lines_are_named(tmp_path):
    append_core_times(tmp_path, CoreTimes(KEY, {"a": 2.0, "b": 1.0}))
    append_core_times(tmp_path, CoreTimes("other", {"a": 1.0, "b": 3.0}, "tracker:key"))
    with (tmp_path / CHOICES).open("a") as file:
        file.write('{"layer": "x", "times_ms": {}}\n[1, 2]\n')
    append_core_times(tmp_path, CoreTimes(KEY, {"a": 0.5, "b": 1.0}))
    skipped = []
    assert load_core_choices(tmp_path, skipped) == {KEY: "a", "other": "a"}
    assert [line.split(": ")[0] for line in skipped] == [
        f"{tmp_path / CHOICES}:{n}" for n in (3, 4)
    ]
    assert load_core_choices(tmp_path / "nothing") == {}
    assert CoreTimes(KEY, {"a": 2.0, "b": 1.0}, failed=["c"]).summary() == (
        "b 1.000 ms, a 2.000 ms: b (c: failed the check)"
    )


def test_legalize_puts_a_layer_on_the_core_measured_fastest_and_tune_tunes_both(
    emulated_amx_first,
):
    host_core = select.interchangeable_cores(SHAPE, LAYER.act, "int8", HOST)[1]
    image = relax.TensorType((1, 4, 8, 8, 16), "float32")
    weight = relax.TensorType((64, 64, 3, 3), "float32")

    def legalized_on(core: str) -> tvm.IRModule:
        bb = relax.BlockBuilder()
        x, w = relax.Var("x", image), relax.Var("p_conv_weight", weight)
        with bb.function("main", [x, w]):
            with bb.dataflow():
                out = bb.emit_output(kernel_call(bb, LAYER, x, core, layouts=BLOCKED, emit=False))
            bb.emit_func_output(out)
        return bb.finalize()

    before = relax.BlockBuilder()
    x, w = relax.Var("x", image), relax.Var("p_conv_weight", weight)
    with before.function("main", [x, w]):
        with before.dataflow():
            conv = relax.op.nn.conv2d(x, w, padding=[1, 1, 1, 1], data_layout="NCHW16c",
                                      out_layout="NCHW16c")  # fmt: skip
            out = before.emit_output(conv)
        before.emit_func_output(out)
    layers = {"p_conv_weight": LAYER}
    for choices, core in (({}, EMULATED.name), ({KEY: host_core}, host_core)):
        after = LegalizeQuantizedLayers(layers, HOST, choices)(before.finalize())
        tvm.ir.assert_structural_equal(after, legalized_on(core))
        # tune tunes the kernel on its core, and with the target on the other core too
        tasks = kernel_tasks(after, {"conv": LAYER})
        assert [task.spec.core for task in tasks] == [core]
        others = [task.spec.core for task in kernel_tasks(after, {"conv": LAYER}, HOST)]
        assert others == [core, ({EMULATED.name, host_core} - {core}).pop()]


def test_tune_times_the_cores_of_a_layer_and_compile_reads_the_fastest(
    emulated_amx_first, tmp_path
):
    """``--trials 0``: no search, the cores still timed; their kernels pass the check first."""
    spec = KernelSpec(LAYER, SHAPE, EMULATED.name, Epilogue(residual=True, relu=True), BLOCKED)
    folder = tmp_path / "llvm-host"
    lines = []
    (result,) = tune([KernelTask(spec)], HOST, trials=0, folder=folder, progress=lines.append)
    host_core = select.interchangeable_cores(SHAPE, LAYER.act, "int8", HOST)[1]
    times = result.cores
    assert times.layer == KEY and set(times.times_ms) == {EMULATED.name, host_core}
    assert all(ms > 0 for ms in times.times_ms.values()) and times.failed == []
    assert f"cores of conv +add_relu: {times.summary()}" in lines
    written = json.loads((folder / CHOICES).read_text())
    assert written == {"layer": KEY, "times_ms": times.times_ms, "device": "local", "failed": []}
    assert TunedSchedules(folder, HOST, {"conv": LAYER}).core_choices == {KEY: times.fastest}

    both = [KernelTask(spec), KernelTask(replace(spec, core=host_core))]
    again = tune(both, HOST, trials=0, folder=folder)
    assert len((folder / CHOICES).read_text().splitlines()) == 2  # again, once for the layer
    assert again[0].cores is not None and again[1].cores is None
