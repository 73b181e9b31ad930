"""PromoteAveragesToFloat64: Before/Expected modules compared structurally."""

from __future__ import annotations

import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from fgq_tvm.relax_passes import PromoteAveragesToFloat64


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((1, 4, 6, 6), "float32"), i: R.Tensor((1, 4, 6, 6), "int32")):
        with R.dataflow():
            lv = R.nn.adaptive_avg_pool2d(x, output_size=[3, 3])
            lv1 = R.nn.avg_pool2d(lv, pool_size=[2, 2])
            lv2 = R.mean(lv1, axis=[-1, -2], keepdims=True)
            lv3 = R.mean(i, axis=[-1, -2], keepdims=True)
            gv = (lv2, lv3)
            R.output(gv)
        return gv


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((1, 4, 6, 6), "float32"), i: R.Tensor((1, 4, 6, 6), "int32")):
        with R.dataflow():
            lv4 = R.astype(x, "float64")
            lv5 = R.nn.adaptive_avg_pool2d(lv4, output_size=[3, 3])
            lv = R.astype(lv5, "float32")
            lv6 = R.astype(lv, "float64")
            lv7 = R.nn.avg_pool2d(lv6, pool_size=[2, 2])
            lv1 = R.astype(lv7, "float32")
            lv8 = R.astype(lv1, "float64")
            lv9 = R.mean(lv8, axis=[-1, -2], keepdims=True)
            lv2 = R.astype(lv9, "float32")
            lv3 = R.mean(i, axis=[-1, -2], keepdims=True)
            gv = (lv2, lv3)
            R.output(gv)
        return gv


def test_float32_averages_run_in_float64():
    tvm.ir.assert_structural_equal(PromoteAveragesToFloat64()(Before), Expected)
