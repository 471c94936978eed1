"""tract (through edgegen) against onnxruntime on the very same ONNX files, in the same run.

    cargo build --release
    /work/venv/bin/python tools/bench_vs_ort.py MODELS_DIR [--threads 1 2] [--runs 3] [--only NAME ...]
                                                [--markdown OUT.md] [--edgegen target/release/edgegen]

MODELS_DIR holds what tools/make_bench_models.py writes: one directory per model with model.onnx
and bench.json (the input shapes to bench). For every model, shape and thread count, two fresh
processes run one after the other, so each peak RSS (VmHWM) is that engine's own:

  tract:        edgegen bench --onnx FILE --input NAME=SPEC ... --threads N --runs R --json
  onnxruntime:  this script's --ort-worker mode: CPUExecutionProvider, intra-op threads N,
                inter-op threads 1, ORT_ENABLE_ALL graph optimizations, sequential execution.

Both engines get bit-identical inputs (the splitmix64 stream src/bench.rs documents) and their
outputs are compared (max abs difference, and the largest output value for scale), so the
comparison is of the same computation. Timing: the first run is the warm-up, then the median of
R runs. GFLOP/s counts Conv/MatMul/Gemm (tools/onnx_flops.py). Prints one table whose last line
is `worst ratio: X` (the largest tract/ORT time ratio), and with --markdown writes the table with
the machine, versions and the exact command, for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

M64 = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
DEFAULT_INT_RANGE = 1000


# --- Inputs: the same stream as src/bench.rs (InputFill) ----------------------------------------


def splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E37_79B9_7F4A_7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58_476D_1CE4_E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D0_49BB_1331_11EB)
        return z ^ (z >> np.uint64(31))


def name_seed(name: str) -> int:
    h = 0xCBF2_9CE4_8422_2325
    for b in name.encode():
        h = ((h ^ b) * 0x0000_0100_0000_01B3) & 0xFFFF_FFFF_FFFF_FFFF
    return h


def parse_spec(spec: str) -> tuple[list[int], str | None, int]:
    """SHAPE[:DTYPE[:RANGE]] as `edgegen bench --input NAME=...` takes it."""
    parts = spec.split(":")
    shape = [] if parts[0] == "scalar" else [int(d) for d in parts[0].split("x")]
    dtype = parts[1] if len(parts) > 1 else None
    int_range = int(parts[2]) if len(parts) > 2 else DEFAULT_INT_RANGE
    return shape, dtype, int_range


ONNX_TYPES = {"tensor(float)": "f32", "tensor(float16)": "f16", "tensor(int32)": "i32", "tensor(int64)": "i64"}
NUMPY_TYPES = {"f32": np.float32, "float32": np.float32, "f16": np.float16, "float16": np.float16,
               "i32": np.int32, "int32": np.int32, "i64": np.int64, "int64": np.int64}


def fill(name: str, spec: str, declared: str) -> np.ndarray:
    """The values src/bench.rs feeds tract, cast to the graph's declared type as tract's engine does."""
    shape, dtype, int_range = parse_spec(spec)
    kind = dtype or declared
    count = int(np.prod(shape, dtype=np.int64))
    with np.errstate(over="ignore"):
        h = splitmix64(np.uint64(name_seed(name)) + np.arange(count, dtype=np.uint64))
    if kind in ("i32", "int32", "i64", "int64"):
        values = ((h >> np.uint64(11)) % np.uint64(int_range)).astype(np.int64)
    else:
        values = (h >> np.uint64(40)).astype(np.float32) * np.float32(2.0 / 16_777_216.0) - np.float32(1.0)
    return values.reshape(shape).astype(NUMPY_TYPES[declared])


def self_check() -> None:
    """The same reference values src/bench.rs's unit test holds."""
    got = fill("sample", "3", "f32").tolist()
    want = [0.48140156269073486, 0.9709410667419434, -0.06493687629699707]
    ids = fill("input_ids", "3:i64:49408", "i64").tolist()
    if got != want or ids != [1729, 49125, 18278]:
        raise SystemExit(f"input generator out of step with src/bench.rs: {got} {ids}")


# --- The onnxruntime worker (a fresh process per measurement) --------------------------------------


def proc_status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def ort_worker(request: dict) -> dict:
    import onnxruntime as ort

    rss_before = proc_status_bytes("VmRSS:")
    options = ort.SessionOptions()
    options.intra_op_num_threads = request["threads"]
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    started = time.perf_counter()
    session = ort.InferenceSession(request["model"], sess_options=options, providers=["CPUExecutionProvider"])
    load_ms = (time.perf_counter() - started) * 1e3
    declared = {i.name: ONNX_TYPES.get(i.type, "f32") for i in session.get_inputs()}
    missing = set(declared) - set(request["inputs"])
    if missing:
        raise SystemExit(f"{request['model']}: no input spec for {sorted(missing)}")
    feed = {name: fill(name, spec, declared[name]) for name, spec in request["inputs"].items()}
    started = time.perf_counter()
    outputs = session.run(None, feed)
    first_ms = (time.perf_counter() - started) * 1e3
    runs = []
    for _ in range(max(1, request["runs"])):
        started = time.perf_counter()
        session.run(None, feed)
        runs.append((time.perf_counter() - started) * 1e3)
    peak = proc_status_bytes("VmHWM:")
    files = []
    for i, value in enumerate(outputs):
        path = Path(request["save_outputs"]) / f"output{i}.npy"
        np.save(path, np.asarray(value, dtype=np.float32))
        files.append(str(path))
    return {"engine": "onnxruntime", "load_ms": load_ms, "first_run_ms": first_ms,
            "median_ms": statistics.median_high(runs), "runs_ms": runs, "rss_before_load_bytes": rss_before,
            "peak_rss_bytes": peak, "outputs": files}


# --- Orchestration ---------------------------------------------------------------------------------


def run_tract(edgegen: Path, model: Path, inputs: dict, threads: int, runs: int, out_dir: Path) -> dict:
    cmd = [str(edgegen), "bench", "--onnx", str(model), "--threads", str(threads), "--runs", str(runs),
           "--json", "--save-outputs", str(out_dir)]
    for name, spec in inputs.items():
        cmd += ["--input", f"{name}={spec}"]
    env = {**os.environ, "EDGEGEN_LOG": "warn"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{done.stderr}")
    report = json.loads(done.stdout)
    report["command"] = shlex.join(cmd)
    return report


def run_ort(model: Path, inputs: dict, threads: int, runs: int, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    request = {"model": str(model), "inputs": inputs, "threads": threads, "runs": runs,
               "save_outputs": str(out_dir)}
    done = subprocess.run([sys.executable, __file__, "--ort-worker", json.dumps(request)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"onnxruntime worker for {model} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def outputs_of(report: dict) -> list[np.ndarray]:
    """A report's outputs as float64 arrays: tract's raw files with their shapes, or onnxruntime's .npy files."""
    arrays = []
    for output in report["outputs"]:
        if isinstance(output, dict):
            value = np.fromfile(output["file"], dtype="<f4").reshape(output["shape"])
        else:
            value = np.load(output)
        arrays.append(value.astype(np.float64))
    return arrays


def output_diffs(got: dict, want: dict) -> tuple[list[np.ndarray], float]:
    """|got - want| per output, and the largest |want|."""
    diffs, scale = [], 0.0
    for i, (a, b) in enumerate(zip(outputs_of(got), outputs_of(want))):
        if a.shape != b.shape:
            raise RuntimeError(f"output {i}: shapes {a.shape} and {b.shape}")
        diffs.append(np.abs(a - b))
        scale = max(scale, float(np.max(np.abs(b))))
    return diffs, scale


def compare_outputs(tract: dict, ort: dict) -> tuple[float, float]:
    """(max abs difference, largest |value|) over all outputs."""
    diffs, scale = output_diffs(tract, ort)
    return max((float(np.max(d)) for d in diffs), default=0.0), scale


def macs_for(model: Path, inputs: dict) -> dict | None:
    import onnx_flops

    try:
        shapes = {name: parse_spec(spec)[0] for name, spec in inputs.items()}
        return onnx_flops.count_macs(model, shapes)
    except Exception as err:  # a count that fails leaves the GFLOP/s column empty, not the run
        print(f"{model}: FLOP count failed: {err}", file=sys.stderr)
        return None


def models_in(root: Path, only: list[str] | None) -> list[tuple[Path, dict]]:
    found = []
    for sidecar in sorted(root.glob("*/bench.json")):
        doc = json.loads(sidecar.read_text())
        if only and doc["name"] not in only:
            continue
        found.append((sidecar.parent / doc.get("file", "model.onnx"), doc))
    return found


def mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1_048_576:.0f}"


def gflops(macs: dict | None, ms: float) -> str:
    if not macs or macs["unknown"] or ms <= 0:
        return "-"
    return f"{2 * macs['macs'] / ms / 1e6:.1f}"


COLUMNS = ["component", "shape", "threads", "tract ms", "ORT ms", "tract/ORT", "tract GFLOP/s", "ORT GFLOP/s",
           "tract peak RSS MB", "ORT peak RSS MB", "tract load+opt ms", "ORT load ms", "GFLOP", "max abs diff"]


def row_for(doc: dict, shape: dict, threads: int, tract: dict, ort: dict, macs: dict | None,
            diff: tuple[float, float]) -> list[str]:
    ratio = tract["median_ms"] / ort["median_ms"] if ort["median_ms"] > 0 else float("inf")
    return [doc["name"], shape["label"], str(threads), f"{tract['median_ms']:.1f}", f"{ort['median_ms']:.1f}",
            f"{ratio:.2f}", gflops(macs, tract["median_ms"]), gflops(macs, ort["median_ms"]),
            mb(tract["peak_rss_bytes"]), mb(ort["peak_rss_bytes"]),
            f"{tract['load_ms'] + tract['optimize_ms']:.0f}", f"{ort['load_ms']:.0f}",
            "-" if not macs or macs["unknown"] else f"{2 * macs['macs'] / 1e9:.2f}",
            f"{diff[0]:.2g} (of {diff[1]:.2g})"], ratio


FIDELITY_COLUMNS = ["component", "shape", "float32 model", "tract vs float32: max / mean abs diff",
                    "ORT vs float32: max / mean abs diff"]


def deviation(got: dict, reference: dict) -> str:
    """Max and mean absolute difference of a report's outputs from a reference's, and the scale."""
    diffs, scale = output_diffs(got, reference)
    flat = np.concatenate([d.ravel() for d in diffs])
    return f"{float(np.max(flat)):.2g} / {float(np.mean(flat)):.2g} (of {scale:.2g})"


def float32_source(models_dir: Path, doc: dict) -> Path | None:
    """The float32 model an int8 / float16 variant was made from (its sidecar's `source`)."""
    name, _, how = doc.get("source", "").partition(" ")
    model = models_dir / name / "model.onnx"
    return model if how in ("quantized", "converted") and model.is_file() else None


def render_text(rows: list[list[str]], columns: list[str] = COLUMNS) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def render_markdown(rows: list[list[str]], columns: list[str] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def versions() -> dict:
    import onnxruntime as ort

    lock = (REPO / "Cargo.lock").read_text()
    tract = re.search(r'name = "tract-core"\nversion = "([^"]+)"', lock)
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    return {"tract": tract.group(1) if tract else "?", "onnxruntime": ort.__version__, "rustc": rustc or "?",
            "python": platform.python_version(), "numpy": np.__version__}


def machine(fma_units: int) -> tuple[dict, str]:
    import onnx_flops

    peak = onnx_flops.cpu_peak(fma_units)
    mem = proc_meminfo_gb()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = (f"{peak['cpu']}, {peak['cores']} cores at {peak['ghz']} GHz (/proc/cpuinfo), "
            f"{mem:.0f} GB RAM, {platform.system()} {platform.release()}; SIMD flags: {' '.join(peak['flags'])}; "
            f"load average {load:.1f} at the start")
    return peak, text


def proc_meminfo_gb() -> float:
    try:
        line = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal:"))
        return int(line.split()[1]) / 1024 / 1024
    except (OSError, StopIteration):
        return float("nan")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--ort-worker":
        print(json.dumps(ort_worker(json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models_dir", type=Path)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up (median)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="model names (directory names) to bench")
    parser.add_argument("--shapes", nargs="+", metavar="LABEL", help="shape labels to bench (e.g. 256x256)")
    parser.add_argument("--edgegen", type=Path, default=REPO / "target" / "release" / "edgegen")
    parser.add_argument("--markdown", type=Path, help="also write the table with machine and command here")
    parser.add_argument("--fma-units", type=int, default=2, help="FMA units per core, for the peak (see onnx_flops)")
    parser.add_argument("--against-float32", action="store_true",
                        help="for int8 / float16 variants, also compare both engines' outputs with onnxruntime's "
                             "on the float32 model they were made from (same inputs)")
    args = parser.parse_args()
    self_check()
    if not args.edgegen.is_file():
        raise SystemExit(f"{args.edgegen}: not found (cargo build --release)")
    models = models_in(args.models_dir, args.only)
    if not models:
        raise SystemExit(f"{args.models_dir}: no */bench.json (tools/make_bench_models.py writes them)")
    peak, machine_text = machine(args.fma_units)
    rows, ratios, fidelity = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for model, doc in models:
            for shape in doc["shapes"]:
                if args.shapes and shape["label"] not in args.shapes:
                    continue
                macs = macs_for(model, shape["inputs"])
                for threads in args.threads:
                    work = Path(tmp) / f"{doc['name']}-{shape['label']}-{threads}".replace(" ", "_")
                    tract = run_tract(args.edgegen, model, shape["inputs"], threads, args.runs, work / "tract")
                    ort = run_ort(model, shape["inputs"], threads, args.runs, work / "ort")
                    diff = compare_outputs(tract, ort)
                    row, ratio = row_for(doc, shape, threads, tract, ort, macs, diff)
                    rows.append(row)
                    ratios.append(ratio)
                    print(render_text([row]).splitlines()[1], file=sys.stderr, flush=True)
                    source = float32_source(args.models_dir, doc)
                    if args.against_float32 and source and threads == args.threads[0]:
                        reference = run_ort(source, shape["inputs"], threads, 0, work / "float32")
                        fidelity.append([doc["name"], shape["label"], source.parent.name,
                                         *(deviation(got, reference) for got in (tract, ort))])
    worst = max(ratios) if ratios else float("nan")
    print(render_text(rows))
    if fidelity:
        print()
        print(render_text(fidelity, FIDELITY_COLUMNS))
    print(f"peak: {peak['derivation']}")
    print(f"worst ratio: {worst:.2f}")
    if args.markdown:
        command = "/work/venv/bin/python tools/bench_vs_ort.py " + shlex.join(sys.argv[1:])
        v = versions()
        doc = "\n".join([
            f"Machine: {machine_text}.",
            f"FMA peak (f32): {peak['derivation']}.",
            f"Versions: tract {v['tract']} (edgegen release build, {v['rustc']}), onnxruntime {v['onnxruntime']} "
            f"(CPUExecutionProvider), Python {v['python']}, numpy {v['numpy']}.",
            f"Runs: warm-up + median of {args.runs}; threads {' and '.join(map(str, args.threads))}; "
            "each measurement in a fresh process.",
            "",
            "```sh",
            "cargo build --release",
            command,
            "```",
            "",
            render_markdown(rows),
            "",
            f"worst ratio: {worst:.2f}",
            "",
            *([render_markdown(fidelity, FIDELITY_COLUMNS), ""] if fidelity else []),
        ])
        args.markdown.write_text(doc)
        print(f"wrote {args.markdown}", file=sys.stderr)


if __name__ == "__main__":
    main()
