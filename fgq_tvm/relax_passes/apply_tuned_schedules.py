"""ApplyTunedSchedules: quantized kernels replaced by their tuned schedules where there are any.

Rewrites every kernel PrimFunc of :class:`~fgq_tvm.relax_passes.LegalizeQuantizedLayers`
(attribute ``fgq.layer``) for which ``tuned(func)`` returns a PrimFunc: the module then holds
that PrimFunc under the same name, with the kernel's attributes and ``fgq.schedule = "tuned"``.
The calls do not change (a tuned kernel computes the same thing with the same arguments). Where
``tuned`` returns ``None`` the kernel keeps its default schedule and gets
``fgq.schedule = "default"``.

``tuned`` is :class:`fgq_tvm.tuning.TunedSchedules`: it looks the kernel's workload up in a
MetaSchedule database and verifies the result against the reference before handing it out.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm

Tuned = Callable[[tvm.tirx.PrimFunc], "tvm.tirx.PrimFunc | None"]


@tvm.transform.module_pass(opt_level=0, name="ApplyTunedSchedules")
class ApplyTunedSchedules:
    """Swap in tuned kernels (see the module docstring).

    Parameters
    ----------
    tuned
        Maps a kernel PrimFunc to its tuned version, or ``None``.
    """

    def __init__(self, tuned: Tuned):
        self.tuned = tuned

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        result = tvm.IRModule(dict(mod.functions_items()), mod.attrs, mod.global_infos)
        for global_var, func in mod.functions_items():
            attrs = func.attrs if func.attrs is not None else {}
            if isinstance(func, tvm.tirx.PrimFunc) and "fgq.layer" in attrs:
                tuned = self.tuned(func)
                schedule = "default" if tuned is None else "tuned"
                chosen = func if tuned is None else tuned
                result[global_var] = chosen.with_attrs({**attrs, "fgq.schedule": schedule})
        return result
