"""Quantized conv2d and dense on NVIDIA GPUs: compute, schedule, knobs.

Two cores, for a ``cuda`` target (:func:`is_cuda`):

* ``int8-gemm-cuda``, the integer weight encodings (``ternary_int8_scales``: ``w = t *
  alpha_q``; its asymmetric form; ``int8``): the layer as an implicit GEMM of int8 operands,
  exact in int32, on the tensor cores where the GEMM is large enough:

  1. the **pack** (:func:`gemm_pack_compute`), run once on the GPU when the module is loaded
     (the module's ``prepare``): the stored weights (ternary in base 3, five to a byte, with
     their int8 scales; or int8) decoded into ``wgemm [K, C*R*S]`` int8 (row ``k``: the
     weights of filter ``k`` in PyTorch's order, channel then kernel position), and
     ``offset_sums[k] = (128 - offset) * sum w[k]``;
  2. the **layer** (:func:`gemm_conv2d_compute`), per inference: ``a[m, j]``, the im2col
     matrix of the activations as signed bytes (``m``: batch, output row and column; ``j``:
     channel and kernel position, so neighbouring elements of a row are neighbouring pixels of
     one channel of the NCHW input), read from the float32 input (quantized here) or from the
     activation bytes the previous kernel wrote; a byte ``q`` stored with the quantizer's
     offset (:meth:`~fgq_tvm.quant.layers.ActQuant.stored`, value ``q - offset``) becomes
     ``q - 128``, padding the value 0; so ``sum w * (q - offset) = sum w * a + offset_sums``
     exactly. ``acc[m, k] = sum_j a[m, j] * wgemm[k, j]`` in int32, then ``y =
     f32(f64(acc + offset_sums) * f64(out_scale[k])) + bias`` and the epilogue (residual add,
     ReLU, the next layer's quantization), stored NCHW;

* ``bitplane-cuda``, every other layer (ternary weights with float group scales): the
  bitplane core's compute (:func:`~fgq_tvm.schedules.conv2d.conv2d_compute`, the per-group
  integer sums scaled in float64 as the reference orders them) on GPU threads.

Schedule: DLight's GPU rules (``tvm.s_tir.dlight.gpu``). On the GEMM, its matmul rule inlines the
im2col into the shared-memory tiles and the epilogue into the stores and computes the tiles on a
2-D thread tile. Not yet on the tensor cores: DLight's int8 WMMA rule (for GEMMs whose three
extents all exceed 64) builds code that TVM 0.27's CUDA codegen rejects
(:data:`NO_TENSOR_CORES`). Every other PrimFunc (the packs, the bitplane core) gets DLight's
reduction or fallback rule: one thread per output element. There is no tuning space yet
(:attr:`~fgq_tvm.schedules.core.Core.tunable` is false).

NumPy reference: ``reference_forward`` of the quantized model (the arithmetic above is that of
:mod:`fgq_tvm.schedules.conv2d`). The same PrimFuncs, unscheduled, run on the CPU in the tests
(:func:`~fgq_tvm.schedules.select.build_layer` builds them as they are for an ``llvm`` target).
"""

from __future__ import annotations

from tvm import te, tirx

from ..quant.layers import ActQuant
from .conv2d import ConvSchedule, conv2d_compute, dequantize, layer_arguments, output_stage
from .conv2d import stored_activation as stored_byte
from .core import INTEGER_ENCODINGS, Conv2dShape, Core, Epilogue, LayerKernels, WeightEncoding
from .layout import NCHW, Layouts

SIGNED_ZERO = 128  # a stored activation byte q is the signed byte q - 128 on the tensor cores
STORAGE = "base3"  # the weights are decoded once, at load time: the densest form
# DLight's int8 tensor-core GEMM fails in TVM 0.27's CUDA codegen on these PrimFuncs (a WMMA
# fragment without its layout), even on a plain im2col GEMM: its SIMT GEMM is used instead
NO_TENSOR_CORES = "dlight.do_not_tensorize"


def is_cuda(target) -> bool:
    """Whether ``target`` (a :class:`tvm.target.Target` or ``None``) is an NVIDIA GPU."""
    return target is not None and str(target.kind.name) == "cuda"


def _reduction_size(shape: Conv2dShape) -> int:
    """``C * R * S``: the GEMM's reduction extent."""
    return shape.kernel[0] * shape.kernel[1] * shape.in_channels


def _window_element(j, shape: Conv2dShape) -> tuple:
    """``(r, s, c)`` of the GEMM's reduction index ``j = (c * R + r) * S + s``."""
    k_h, k_w = shape.kernel
    return j // k_w % k_h, j % k_w, j // (k_h * k_w)


def gemm_pack_compute(shape: Conv2dShape, act: ActQuant, encoding: WeightEncoding) -> list:
    """TE compute of the load-time pack: ``[*stored weights, wgemm, offset_sums]``.

    The stored weights are all the weights of
    :func:`~fgq_tvm.schedules.conv2d.layer_arguments` in :data:`STORAGE` (the weight and its
    int8 scales: the layer reads only ``out_scale`` and ``bias`` as they are stored).
    """
    args = layer_arguments(shape, encoding, STORAGE)

    def weight(k, j):
        return args.integer_weight(*_window_element(j, shape), k)

    wgemm = te.compute(
        (shape.out_channels, _reduction_size(shape)),
        lambda k, j: weight(k, j).astype("int8"),
        name="wgemm",
    )
    j = te.reduce_axis((0, _reduction_size(shape)), name="j")
    offset = SIGNED_ZERO - act.offset
    offset_sums = te.compute(
        (shape.out_channels,), lambda k: te.sum(weight(k, j) * offset, axis=j), name="offset_sums"
    )
    return [*args.weights, wgemm, offset_sums]


def gemm_conv2d_compute(
    shape: Conv2dShape,
    act: ActQuant,
    encoding: WeightEncoding,
    epilogue: Epilogue,
    quantized_input: bool = False,
) -> list:
    """TE compute of the layer on ``int8-gemm-cuda``; returns its arguments, output last:
    ``x, wgemm, offset_sums, out_scale, bias[, residual], y`` (``x`` float32, or with
    ``quantized_input`` the activation bytes; ``y`` float32, or bytes when the epilogue
    quantizes; all NCHW)."""
    nchw = (shape.batch, shape.in_channels, shape.height, shape.width)
    x = te.placeholder(nchw, "uint8" if quantized_input else "float32", name="x")
    size = _reduction_size(shape)
    wgemm = te.placeholder((shape.out_channels, size), "int8", name="wgemm")
    offset_sums = te.placeholder((shape.out_channels,), "int32", name="offset_sums")
    out_scale = te.placeholder((shape.out_channels,), name="out_scale")
    bias = te.placeholder((shape.out_channels,), name="bias")
    a = _im2col(x, shape, act)
    j = te.reduce_axis((0, size), name="j")
    acc = te.compute(
        (a.shape[0], shape.out_channels),
        lambda m, k: te.sum(a[m, j].astype("int32") * wgemm[k, j].astype("int32"), axis=j),
        name="acc",
    )
    rows, columns = shape.out_height, shape.out_width

    def value(b, k, oh, ow):
        exact = acc[(b * rows + oh) * columns + ow, k] + offset_sums[k]
        return dequantize(exact, out_scale[k]) + bias[k]

    y = output_stage(shape, value, epilogue, NCHW)
    return [x, wgemm, offset_sums, out_scale, bias, *y]


def _im2col(x: te.Tensor, shape: Conv2dShape, act: ActQuant) -> te.Tensor:
    """``a[m, j]``: the signed byte ``q - 128`` of the input at output position ``m``'s window
    element ``j`` (:func:`_window_element`); padding holds the value 0 (``offset - 128``)."""
    (pad_h, pad_w), (stride_h, stride_w) = shape.padding, shape.stride
    dil_h, dil_w = shape.dilation
    rows, columns = shape.out_height, shape.out_width

    def element(m, j):
        b, oh, ow = m // (rows * columns), m // columns % rows, m % columns
        r, s, c = _window_element(j, shape)
        h = oh * stride_h + r * dil_h - pad_h
        w = ow * stride_w + s * dil_w - pad_w
        inside = tirx.all(h >= 0, h < shape.height, w >= 0, w < shape.width)
        row = tirx.max(tirx.min(h, shape.height - 1), 0)
        clamped = x[b, c, row, tirx.max(tirx.min(w, shape.width - 1), 0)]
        stored = clamped if x.dtype == "uint8" else stored_byte(clamped, act)
        signed = (stored.astype("int32") - SIGNED_ZERO).astype("int8")
        return tirx.if_then_else(inside, signed, tirx.const(act.offset - SIGNED_ZERO, "int8"))

    return te.compute((shape.batch * rows * columns, _reduction_size(shape)), element, name="a")


class GemmCudaCore(Core):
    """``int8-gemm-cuda``: integer layers as implicit int8 GEMMs (see the module docstring)."""

    name = "int8-gemm-cuda"
    ternary_storage = STORAGE
    activation_bytes = True
    rule_scheduled = True

    def available(self, target) -> bool:
        return is_cuda(target)

    def supports(self, shape: Conv2dShape, act: ActQuant, encoding: WeightEncoding) -> bool:
        return encoding in INTEGER_ENCODINGS

    def layer_kernels(
        self,
        shape: Conv2dShape,
        act: ActQuant,
        encoding: WeightEncoding,
        epilogue: Epilogue,
        layouts: Layouts,
        quantized_input: bool,
    ) -> LayerKernels:
        layer = te.create_prim_func(
            gemm_conv2d_compute(shape, act, encoding, epilogue, quantized_input)
        ).with_attr(NO_TENSOR_CORES, True)
        pack_tensors = gemm_pack_compute(shape, act, encoding)
        pack = te.create_prim_func(pack_tensors)
        prepared = (
            ((shape.out_channels, _reduction_size(shape)), "int8"),
            ((shape.out_channels,), "int32"),
        )
        return LayerKernels(
            self.name,
            layer,
            (shape.output_dims, epilogue.output_dtype),
            pack,
            prepared,
            len(pack_tensors) - len(prepared),
            layouts,
        )


class BitplaneCudaCore(Core):
    """``bitplane-cuda``: the bitplane core's compute on GPU threads, for the layers the GEMM
    core does not compute (see the module docstring)."""

    name = "bitplane-cuda"
    rule_scheduled = True

    def available(self, target) -> bool:
        return is_cuda(target)

    def supports(self, shape: Conv2dShape, act: ActQuant, encoding: WeightEncoding) -> bool:
        return True

    def layer_kernels(
        self,
        shape: Conv2dShape,
        act: ActQuant,
        encoding: WeightEncoding,
        epilogue: Epilogue,
        layouts: Layouts,
        quantized_input: bool,
    ) -> LayerKernels:
        whole_width = ConvSchedule("channels")  # computes exactly the output's columns
        compute = conv2d_compute(shape, act, encoding, whole_width, epilogue)
        layer = te.create_prim_func(compute)
        return LayerKernels(self.name, layer, (shape.output_dims, epilogue.output_dtype))


GEMM_CUDA_CORE = GemmCudaCore()
BITPLANE_CUDA_CORE = BitplaneCudaCore()
