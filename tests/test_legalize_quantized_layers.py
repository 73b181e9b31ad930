"""LegalizeQuantizedLayers: Before/Expected modules compared structurally."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import tvm
from helpers import kernel_call, ternary_conv_layer
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from fgq_tvm.config import LayerConfig
from fgq_tvm.quant.layers import ActQuant, QuantizedLayer
from fgq_tvm.relax_passes import LegalizeQuantizedLayers
from fgq_tvm.schedules.layout import BLOCKED, NCHW, NCHW16C, index_map
from fgq_tvm.target import parse_target

RNG = np.random.default_rng(0)

CONV = QuantizedLayer(
    name="conv",
    op="conv2d",
    config=LayerConfig("ternary", 4),
    act=ActQuant(0.0625, 8, signed=True),
    weight=RNG.integers(-1, 2, (4, 8, 3, 3)).astype(np.int8),
    group_size=4,
    bias=RNG.normal(size=4).astype(np.float32),
    group_scale=RNG.uniform(0.1, 1.0, (4, 2, 3, 3)).astype(np.float32),
    padding=(1, 1),
)
FC = QuantizedLayer(
    name="fc",
    op="linear",
    config=LayerConfig("int8", None),
    act=ActQuant(0.125, 8, signed=False),
    weight=RNG.integers(-127, 128, (3, 4, 1, 1)).astype(np.int8),
    group_size=4,
    bias=np.zeros(3, np.float32),
    channel_scale=RNG.uniform(0.01, 0.1, 3).astype(np.float32),
)


@I.ir_module
class Before:
    @R.function
    def main(
        x: R.Tensor((1, 8, 6, 6), "float32"),
        p_conv_weight: R.Tensor((4, 8, 3, 3), "float32"),
        p_fc_weight: R.Tensor((3, 4), "float32"),
        p_float_weight: R.Tensor((2, 3), "float32"),
    ):
        with R.dataflow():
            lv = R.nn.conv2d(x, p_conv_weight, padding=[1, 1, 1, 1])
            lv1 = R.nn.relu(lv)
            lv2 = R.mean(lv1, axis=[-1, -2], keepdims=False)
            lv3 = R.permute_dims(p_fc_weight, axes=[1, 0])
            lv4 = R.matmul(lv2, lv3, out_dtype="float32")
            lv5 = R.permute_dims(p_float_weight, axes=[1, 0])
            lv6 = R.matmul(lv4, lv5, out_dtype="float32")
            R.output(lv6)
        return lv6


def expected(cores: tuple[str, str] = ("bitplane", "bitplane")) -> tvm.IRModule:
    """The module the pass must produce: quantized layers as call_tir, the float layer kept."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 6, 6), "float32"))
    conv_w = relax.Var("p_conv_weight", relax.TensorType((4, 8, 3, 3), "float32"))
    fc_w = relax.Var("p_fc_weight", relax.TensorType((3, 4), "float32"))
    float_w = relax.Var("p_float_weight", relax.TensorType((2, 3), "float32"))
    with bb.function("main", [x, conv_w, fc_w, float_w]):
        with bb.dataflow():
            conv = kernel_call(bb, CONV, x, cores[0])
            relu = bb.emit(relax.op.nn.relu(conv))
            mean = bb.emit(relax.op.mean(relu, axis=[-1, -2], keepdims=False))
            bb.emit(relax.op.permute_dims(fc_w, axes=[1, 0]))
            image = bb.emit(relax.op.reshape(mean, (1, 4, 1, 1)))
            fc = kernel_call(bb, FC, image, cores[1])
            logits = bb.emit(relax.op.reshape(fc, (1, 3)))
            float_t = bb.emit(relax.op.permute_dims(float_w, axes=[1, 0]))
            out = bb.emit_output(relax.op.matmul(logits, float_t, out_dtype="float32"))
        bb.emit_func_output(out)
    return bb.finalize()


def test_conv_and_linear_become_quantized_kernels():
    layers = {"p_conv_weight": CONV, "p_fc_weight": FC}
    after = LegalizeQuantizedLayers(layers)(Before)
    tvm.ir.assert_structural_equal(after, expected())


def test_vnni_target_packs_weights_for_the_dot_core():
    """The int8 linear layer goes to the dot core (pack, then kernel); the conv, whose group
    scales are float and activations signed, stays on the bitplane core."""
    layers = {"p_conv_weight": CONV, "p_fc_weight": FC}
    vnni = parse_target("llvm -mcpu=cascadelake")
    after = LegalizeQuantizedLayers(layers, vnni)(Before)
    tvm.ir.assert_structural_equal(after, expected(("bitplane", "int8-dot-vnni")))


def test_module_without_quantized_parameters_is_unchanged():
    after = LegalizeQuantizedLayers({})(Before)
    tvm.ir.assert_structural_equal(after, Before)


UNSIGNED = replace(ternary_conv_layer(16, 16), name="unsigned")
SIGNED = replace(UNSIGNED, name="signed", act=ActQuant(0.0625, 8, signed=True))


@I.ir_module
class Blocked:
    @R.function
    def main(
        x: R.Tensor((1, 1, 6, 6, 16), "float32"),
        p_unsigned_weight: R.Tensor((16, 16, 3, 3), "float32"),
        p_signed_weight: R.Tensor((16, 16, 3, 3), "float32"),
    ):
        with R.dataflow():
            lv = R.nn.conv2d(
                x, p_unsigned_weight, padding=[1, 1, 1, 1],
                data_layout="NCHW16c", out_layout="NCHW16c",
            )  # fmt: skip
            lv1 = R.nn.conv2d(
                lv, p_signed_weight, padding=[1, 1, 1, 1],
                data_layout="NCHW16c", out_layout="NCHW16c",
            )  # fmt: skip
            R.output(lv1)
        return lv1


def test_blocked_layout_stays_blocked_where_the_core_computes_in_it():
    """On the dot core the kernel reads and writes NCHW16c; the bitplane core (float group
    scales on signed activations) computes in NCHW between two layout transforms."""
    bb = relax.BlockBuilder()
    blocked = relax.TensorType((1, 1, 6, 6, 16), "float32")
    x = relax.Var("x", blocked)
    weights = [relax.Var(f"p_{name}_weight", relax.TensorType((16, 16, 3, 3), "float32"))
               for name in ("unsigned", "signed")]  # fmt: skip
    with bb.function("main", [x, *weights]):
        with bb.dataflow():
            dot = kernel_call(bb, UNSIGNED, x, "int8-dot-vnni", layouts=BLOCKED)
            nchw = bb.emit(relax.op.layout_transform(dot, index_map(NCHW16C, NCHW)))
            plain = kernel_call(bb, SIGNED, nchw, "bitplane")
            out = bb.emit_output(relax.op.layout_transform(plain, index_map(NCHW, NCHW16C)))
        bb.emit_func_output(out)
    layers = {"p_unsigned_weight": UNSIGNED, "p_signed_weight": SIGNED}
    after = LegalizeQuantizedLayers(layers, parse_target("llvm -mcpu=cascadelake"))(Blocked)
    tvm.ir.assert_structural_equal(after, bb.finalize())
