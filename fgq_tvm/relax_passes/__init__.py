"""Graph passes over Relax."""

from .apply_tuned_schedules import ApplyTunedSchedules
from .block_kernel_outputs import BlockKernelOutputs
from .fuse_layer_epilogues import FuseLayerEpilogues
from .legalize_quantized_layers import LegalizeQuantizedLayers
from .lift_constant_computations import PREPARE, LiftConstantComputations
from .promote_averages import PromoteAveragesToFloat64
from .quantize_kernel_outputs import QuantizeKernelOutputs
from .schedule_graph_operators import ScheduleGraphOperators

__all__ = [
    "PREPARE",
    "ApplyTunedSchedules",
    "BlockKernelOutputs",
    "FuseLayerEpilogues",
    "LegalizeQuantizedLayers",
    "LiftConstantComputations",
    "PromoteAveragesToFloat64",
    "QuantizeKernelOutputs",
    "ScheduleGraphOperators",
]
