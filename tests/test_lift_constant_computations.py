"""LiftConstantComputations: Before/Expected modules compared structurally."""

from __future__ import annotations

import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from fgq_tvm.relax_passes import LiftConstantComputations


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((4,), "float32")):
        with R.dataflow():
            ones = R.ones((4,), "float32")
            doubled = R.multiply(ones, R.const(2.0, "float32"))
            halved = R.multiply(ones, R.const(0.5, "float32"))
            scaled = R.multiply(x, doubled)
            y = R.add(scaled, halved)
            R.output(y)
        return y


@I.ir_module
class Expected:
    @R.function
    def prepare() -> R.Tuple(R.Tensor((4,), "float32"), R.Tensor((4,), "float32")):
        with R.dataflow():
            ones = R.ones((4,), "float32")
            doubled = R.multiply(ones, R.const(2.0, "float32"))
            halved = R.multiply(ones, R.const(0.5, "float32"))
            prepared = (doubled, halved)
            R.output(prepared)
        return prepared

    @R.function
    def main(
        x: R.Tensor((4,), "float32"),
        prepared: R.Tuple(R.Tensor((4,), "float32"), R.Tensor((4,), "float32")),
    ):
        with R.dataflow():
            doubled = prepared[0]
            halved = prepared[1]
            scaled = R.multiply(x, doubled)
            y = R.add(scaled, halved)
            R.output(y)
        return y


@I.ir_module
class NothingConstant:
    @R.function
    def main(x: R.Tensor((4,), "float32")):
        with R.dataflow():
            y = R.add(x, x)
            R.output(y)
        return y


@I.ir_module
class NothingLifted:
    @R.function
    def prepare() -> R.Tuple():
        with R.dataflow():
            prepared = ()
            R.output(prepared)
        return prepared

    @R.function
    def main(x: R.Tensor((4,), "float32"), prepared: R.Tuple()):
        with R.dataflow():
            y = R.add(x, x)
            R.output(y)
        return y


def test_computations_on_constants_move_to_prepare():
    tvm.ir.assert_structural_equal(LiftConstantComputations()(Before), Expected)


def test_every_module_gets_prepare():
    tvm.ir.assert_structural_equal(LiftConstantComputations()(NothingConstant), NothingLifted)
