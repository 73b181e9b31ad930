#!/usr/bin/env bash
# Issue 18's GPU check, on a machine with an NVIDIA GPU, its driver and PyTorch (no TVM, no
# network needed). Here, first:  python benchmarks/gpu_check.py prepare
#                                (writes build/gpu_check and build/gpu_check.tar.xz)
# There:                         bash benchmarks/gpu_check.sh [build/gpu_check.tar.xz]
# It checks the CUDA modules against the quantized reference (CIFAR ResNet-20 on the 5,000 eval
# images, ResNet-18/50 on random inputs), times ResNet-18/50 at batch 1 and 64 against PyTorch
# FP32 and FP16 channels_last in the same run, prints the table and writes it to
# benchmarks/results/<gpu key>/gpu-check.md (under $OUT instead where that is set), then the
# GEMM tile search (gemm-tiles.md). Exit status 1: a correctness check failed.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
archive="${1:-$repo/build/gpu_check.tar.xz}"
if [[ ! -f "$archive" ]]; then
    echo "gpu_check.sh: $archive is missing: run 'python benchmarks/gpu_check.py prepare' on a machine with fgq-tvm first" >&2
    exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
tar -C "$work" -xJf "$archive"
folder="$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -1)"
# a device run brings back what is under $OUT: the tables go there where it is set
python3 "$folder/gpu_check.py" run "$folder" --results "${OUT:-$repo/benchmarks/results}"
