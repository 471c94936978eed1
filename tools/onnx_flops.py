"""Multiply-accumulates of an ONNX graph's Conv, MatMul and Gemm nodes at given input shapes,
and this CPU's float32 FMA peak. Used by tools/bench_vs_ort.py for achieved GFLOP/s.

    /work/venv/bin/python tools/onnx_flops.py MODEL.onnx NAME=SHAPE ...   (SHAPE: 1x4x64x64 or scalar)

Shapes come from onnx.shape_inference with data propagation (the exported graphs compute
Reshape targets from Shape ops); where that leaves a Conv/MatMul/Gemm shape unknown,
onnxruntime's symbolic shape inference is tried. Nodes still unknown are listed, not guessed.
Counted: Conv = output elements x (input channels / group) x kernel taps; MatMul = output
elements x K; Gemm = M x N x K. Everything else (normalisation, softmax, elementwise) is left
out: in a UNet it is well under 1% of the arithmetic. FLOPs = 2 x MACs.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import shape_inference

COUNTED = ("Conv", "MatMul", "Gemm")


def parse_shape(text: str) -> list[int]:
    return [] if text == "scalar" else [int(d) for d in text.split("x")]


def _fix_inputs(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> None:
    for value in model.graph.input:
        if value.name not in shapes:
            continue
        dims = value.type.tensor_type.shape
        wanted = shapes[value.name]
        del dims.dim[:]
        for size in wanted:
            dims.dim.add().dim_value = size


def _known_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    known: dict[str, list[int]] = {}
    for init in model.graph.initializer:
        known[init.name] = list(init.dims)
    for value in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if all(d is not None for d in dims):
            known[value.name] = dims
    for node in model.graph.node:  # Constant nodes carry their shape in the attribute
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    known[node.output[0]] = list(attr.t.dims)
    return known


def _node_macs(node, known: dict[str, list[int]]) -> int | None:
    out = known.get(node.output[0])
    if out is None:
        return None
    if node.op_type == "Conv":
        weight = known.get(node.input[1])
        return None if weight is None else int(np.prod(out, dtype=np.int64)) * int(np.prod(weight[1:], dtype=np.int64))
    if node.op_type == "MatMul":
        a = known.get(node.input[0])
        return None if not a else int(np.prod(out, dtype=np.int64)) * a[-1]
    if node.op_type == "Gemm":
        a = known.get(node.input[0])
        if a is None:
            return None
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        k = a[0] if trans_a else a[1]
        return int(np.prod(out, dtype=np.int64)) * k
    return None


def _count(model: onnx.ModelProto) -> tuple[dict[str, int], list[str]]:
    known = _known_shapes(model)
    macs = {op: 0 for op in COUNTED}
    unknown = []
    for i, node in enumerate(model.graph.node):
        if node.op_type not in COUNTED:
            continue
        value = _node_macs(node, known)
        if value is None:
            unknown.append(node.name or f"{node.op_type}#{i}")
        else:
            macs[node.op_type] += value
    return macs, unknown


def count_macs(path: Path, shapes: dict[str, list[int]]) -> dict:
    """{"macs": total, "by_op": {...}, "unknown": [node, ...], "method": ...}."""
    # Weights are not needed, only their dims: external data stays on disk.
    model = onnx.load(str(path), load_external_data=False)
    _fix_inputs(model, shapes)
    inferred = shape_inference.infer_shapes(model, data_prop=True)
    by_op, unknown = _count(inferred)
    method = "onnx.shape_inference (data_prop)"
    if unknown:
        try:
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            # It reads external data by its relative location: resolve it from the model's directory.
            with contextlib.chdir(path.parent):
                symbolic = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
            by_op2, unknown2 = _count(symbolic)
            if len(unknown2) < len(unknown):
                by_op, unknown, method = by_op2, unknown2, "onnxruntime symbolic shape inference"
        except Exception as err:  # the fallback is best effort; the unknown nodes are reported
            print(f"{path}: symbolic shape inference failed: {err}", file=sys.stderr)
    return {"macs": sum(by_op.values()), "by_op": by_op, "unknown": unknown, "method": method}


def cpu_peak(fma_units: int = 2) -> dict:
    """float32 FMA peak = cores x clock x FMA units per core x SIMD lanes x 2 (an FMA is 2 FLOPs).

    Clock: /proc/cpuinfo's "cpu MHz" (in a VM the nominal clock; turbo is not visible). SIMD
    lanes: 16 with AVX-512F, 8 with AVX2+FMA, 4 otherwise. FMA units per core cannot be read
    from the OS: 2 for Xeon Scalable Gold/Platinum and Zen cores, 1 for some Xeon Silver/Bronze
    and most small cores (Cortex-A72 has 1 NEON FMA pipe of 4 lanes: use --fma-units 1 there).
    """
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)$", info, re.M)
    flags_line = re.search(r"^(flags|Features)\s*:\s*(.+)$", info, re.M)
    flags = set(flags_line.group(2).split()) if flags_line else set()
    cores = os.cpu_count() or 1
    lanes = 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else 4
    ghz = float(mhz.group(1)) / 1000 if mhz else None
    peak = cores * ghz * fma_units * lanes * 2 if ghz else None
    simd = {16: "AVX-512", 8: "AVX2+FMA", 4: "128-bit"}[lanes]
    return {
        "cpu": model.group(1).strip() if model else "unknown",
        "cores": cores,
        "ghz": ghz,
        "simd": simd,
        "lanes": lanes,
        "fma_units": fma_units,
        "flags": sorted(f for f in flags if re.match(r"(avx|fma|f16c|amx|neon|asimd|sve)", f)),
        "peak_gflops": peak,
        "derivation": (f"{cores} cores x {ghz:.2f} GHz x {fma_units} FMA units x {lanes} f32 lanes ({simd}) "
                       f"x 2 FLOP/FMA = {peak:.1f} GFLOP/s" if peak else "clock unknown"),
    }


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    shapes = {}
    for arg in sys.argv[2:]:
        name, shape = arg.split("=", 1)
        shapes[name] = parse_shape(shape.split(":")[0])
    result = count_macs(Path(sys.argv[1]), shapes)
    print(f"{result['macs'] / 1e9:.3f} G MACs = {2 * result['macs'] / 1e9:.3f} GFLOP  {result['by_op']}  "
          f"({result['method']}; unknown: {len(result['unknown'])})")
    print(cpu_peak()["derivation"])


if __name__ == "__main__":
    main()
