"""The per-layer summary that ``fgq-tvm compile`` prints: one row per conv or linear layer of a
compiled module, read from its sidecar, then the layer counts."""

from __future__ import annotations

from collections.abc import Mapping

HEADER = (
    "layer", "op", "weights", "act", "kernel", "core", "layout", "input", "epilogue", "schedule",
)  # fmt: skip


def format_summary(sidecar: dict, ops: Mapping[str, str]) -> str:
    """The per-layer table and the layer counts of a compiled module.

    Parameters
    ----------
    sidecar
        The module's sidecar dict (``layers`` and ``float_layers``).
    ops
        ``module path -> op`` of the model's conv and linear layers in model order
        (:func:`~fgq_tvm.models.layer_ops`): the order of the rows, and the op of the layers
        that stayed float.

    Returns
    -------
    str
        A table with one row per conv or linear layer, then one line of counts.
    """
    rows = [_layer_row(layer) for layer in sidecar["layers"]]
    rows += [
        (
            entry["name"],
            ops.get(entry["name"], ""),
            "float",
            "",
            f"stayed float: {entry['reason']}",
            "",
            "",
            "",
            "",
            "",
        )
        for entry in sidecar["float_layers"]
    ]
    order = {name: index for index, name in enumerate(ops)}
    rows.sort(key=lambda row: order.get(row[0], len(order)))
    widths = [max(len(row[i]) for row in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [HEADER, *rows]
    ]
    modes = [layer["weights"] for layer in sidecar["layers"]]
    lines.append(
        f"{modes.count('ternary')} of {len(rows)} conv/linear layers became ternary-group "
        f"operators, {modes.count('int8')} int8, {len(sidecar['float_layers'])} stayed float"
    )
    return "\n".join(lines)


def _layer_row(layer: dict) -> tuple[str, ...]:
    """The summary row of one quantized layer of the sidecar."""
    weights = layer["weights"]
    if weights == "ternary":
        weights = f"ternary-group N={layer['group_size']}"
    act = f"{'s' if layer['act_signed'] else 'u'}{layer['act_bits']}"
    epilogue = layer.get("epilogue") or "-"
    schedule = layer.get("schedule", "default")
    return (
        layer["name"],
        layer["op"],
        weights,
        act,
        layer["kernel"],
        layer["core"],
        layer["layout"],
        "bytes" if layer["input"] == "uint8" else "float",
        epilogue,
        schedule,
    )
