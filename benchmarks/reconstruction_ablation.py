"""What each piece of block reconstruction buys: the same model quantized with reconstruction
variants, each measured against the full-precision model on the same images.

Every variant starts from the defaults that ``fgq-tvm compile`` picks for a CIFAR ResNet with its
data (gptq, mse calibration, BatchNorm correction) and changes one thing: reconstruction off,
re-rounding alone, scales and biases alone, QDrop, more Adam steps, more or fewer calibration
images. The quantized network runs as the PyTorch reference (the compiled module is bit-identical
to it; ``fgq-tvm eval --backend tvm`` checks that).

Two image sets, never mixed:

- ``--split holdout``: calibration-split images that no variant calibrates on (the calibration
  split minus the largest ``--images`` subset). Choose settings here.
- ``--split eval``: the evaluation split. Report the chosen settings here.

Per variant the table gives the top-1 drop, the share of images whose top-1 class differs from
the full-precision model's and the mean KL divergence from the full-precision softmax: the last
two are far less noisy than the drop (one image is 0.02 points of 5,000) and rank variants
whose drops differ by less than the noise. Writes a Markdown table (``--out``), a JSON record
beside it, and prints the table.

Usage::

    python benchmarks/reconstruction_ablation.py cifar_resnet20 \\
        --weights ../shared/data/cifar_resnet/resnet20-12fca82f.th \\
        --data ../shared/data/cifar10/cifar10_test_jpeg.npz --group-size 4 \\
        --variants default,off,rounding-only,scales-only --split holdout \\
        --out benchmarks/results/accuracy/reconstruction-ablation-resnet20-n4.md
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from fgq_tvm.compiler import calibration_batches
from fgq_tvm.config import RECONSTRUCTION_CALIB_IMAGES, QuantConfig, data_defaults
from fgq_tvm.data import SUBSET_SEED, load_calibration, load_npz_split
from fgq_tvm.models import ModelSpec, build_model, macs_per_image
from fgq_tvm.quant.quantize import quantize_model
from fgq_tvm.quant.reconstruction import ReconstructionConfig

EVAL_BATCH = 250


@dataclass(frozen=True)
class Variant:
    """One configuration: reconstruction settings (``None``: reconstruction off) and how many
    calibration images it uses."""

    description: str
    reconstruction: ReconstructionConfig | None = field(default_factory=ReconstructionConfig)
    images: int = RECONSTRUCTION_CALIB_IMAGES


VARIANTS = {
    "default": Variant("the defaults: re-rounding, then 300 Adam steps on scales and biases"),
    "off": Variant("reconstruction off", None),
    "rounding-only": Variant("re-rounding alone", ReconstructionConfig(iterations=0)),
    "scales-only": Variant("scales and biases alone", ReconstructionConfig(rounding=False)),
    "qdrop": Variant("QDrop, p=0.5", ReconstructionConfig(drop_probability=0.5)),
    "steps-1000": Variant("1,000 Adam steps", ReconstructionConfig(iterations=1000)),
    "steps-600": Variant("600 Adam steps", ReconstructionConfig(iterations=600)),
    "batch-64": Variant("64 images per step", ReconstructionConfig(batch_size=64)),
    "images-256": Variant("256 calibration images", images=256),
    "images-2048": Variant("2,048 calibration images", images=2048),
}


@dataclass(frozen=True)
class Measurement:
    variant: str
    description: str
    images: int
    float_top1: float
    quantized_top1: float
    disagreement: float
    kl_divergence: float
    seconds: float

    @property
    def drop(self) -> float:
        return 100 * (self.float_top1 - self.quantized_top1)


def holdout_images(data: Path, spec, excluded: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration-split images outside the first ``excluded`` of the fixed-seed
    permutation that :func:`fgq_tvm.data.load_calibration` draws its subsets from."""
    x, y = load_npz_split(data, "calib", spec)
    order = np.random.default_rng(SUBSET_SEED).permutation(len(y))[excluded:]
    return x[order], y[order]


def logits_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(batch) for batch in x.split(EVAL_BATCH)])


@dataclass(frozen=True)
class Setup:
    """What every variant shares: the model, the data and the images measured on."""

    model: torch.nn.Module
    spec: ModelSpec
    data: Path
    quant: QuantConfig
    images: tuple[torch.Tensor, torch.Tensor]
    float_logits: torch.Tensor


def measure(name: str, variant: Variant, setup: Setup) -> Measurement:
    quant = setup.quant
    if variant.reconstruction is None:
        quant = replace(quant, reconstruction="off")
    calibration, _ = load_calibration(setup.data, setup.spec, limit=variant.images)
    start = time.perf_counter()
    batches = calibration_batches(calibration, setup.spec)
    quantized = quantize_model(setup.model, quant, batches, reconstruction=variant.reconstruction)
    seconds = time.perf_counter() - start
    x, labels = setup.images
    float_logits = setup.float_logits
    logits = logits_of(quantized.reference, x)
    float_log_p = torch.log_softmax(float_logits.double(), dim=1)
    kl = (float_log_p.exp() * (float_log_p - torch.log_softmax(logits.double(), dim=1))).sum(1)
    return Measurement(
        name,
        variant.description,
        variant.images,
        float((float_logits.argmax(1) == labels).double().mean()),
        float((logits.argmax(1) == labels).double().mean()),
        float((logits.argmax(1) != float_logits.argmax(1)).double().mean()),
        float(kl.mean()),
        seconds,
    )


def table(rows: list[Measurement], heading: str) -> str:
    lines = [
        heading,
        "",
        "| variant | calibration images | top-1 drop (points) | top-1 differs from FP (%) "
        "| mean KL from FP | quantize time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row.description} | {row.images} | {row.drop:.2f} | {100 * row.disagreement:.2f} "
            f"| {row.kl_divergence:.4f} | {row.seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--act-bits", type=int, default=8)
    parser.add_argument("--variants", default="default,off,rounding-only,scales-only")
    parser.add_argument("--split", choices=("holdout", "eval"), default="holdout")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the batch sampling: run two to see the noise"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    model, spec = build_model(args.model, args.weights)
    model.eval()
    if args.split == "holdout":
        images = holdout_images(args.data, spec, max(VARIANTS[n].images for n in names))
    else:
        images = load_npz_split(args.data, "eval", spec)
    defaults = data_defaults(True, macs_per_image(model, spec))
    quant = QuantConfig(
        group_size=args.group_size, act_bits=args.act_bits, **defaults.quant_fields()
    )
    setup = Setup(model, spec, args.data, quant, images, logits_of(model, images[0]))
    heading = (
        f"# Block reconstruction variants: {args.model}, N={args.group_size}, "
        f"{args.act_bits}-bit activations, {len(images[1])} images ({args.split} split), "
        f"seed {args.seed}"
    )
    rows = []
    for name in names:
        print(f"{name}: quantizing", flush=True)
        variant = VARIANTS[name]
        if variant.reconstruction is not None:
            variant = replace(
                variant, reconstruction=replace(variant.reconstruction, seed=args.seed)
            )
        rows.append(measure(name, variant, setup))
        print(table(rows[-1:], "").strip().splitlines()[-1], flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(args.out, table(rows, heading))
        record = [asdict(row) | {"drop": row.drop} for row in rows]
        write_atomically(args.out.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    print(table(rows, heading))


if __name__ == "__main__":
    main()
