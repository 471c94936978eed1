"""Quantize a model bundle with onnxruntime's quantization tools.

    /work/venv/bin/python tools/quantize.py BUNDLE OUT [--mode qdq|dynamic|f16] [options]

Modes (only Conv, MatMul and Gemm change; every other op stays float32):

  qdq      int8 weights and uint8 activations in QDQ form (QuantizeLinear/DequantizeLinear pairs
           around each Conv/MatMul/Gemm and the embedding Gathers), static: activation ranges come
           from calibration, i.e. from running the bundle's own pipeline with onnxruntime on a few
           prompts. --qoperator writes QLinearConv/QLinearMatMul instead (Conv and MatMul only),
           which tract runs on integer kernels (docs/quantization.md).
  dynamic  int8 weights; activations are quantized at run time (DynamicQuantizeLinear +
           MatMulInteger). Only MatMul/Gemm by default; --dynamic-conv also turns Conv into
           ConvInteger.
  f16      float16 weights and float16 compute (onnxruntime's float16 converter with float32
           graph inputs/outputs kept), numerically sensitive ops left in float32.

OUT receives a complete bundle: every non-ONNX file of BUNDLE (tokenizer, scheduler, configs,
model_index.json, edgegen.toml with " (int8)"/" (f16)" added to its name) plus the converted ONNX
files and `quantization.json` (what was done, sizes, and each component's max abs difference to
the float32 file under onnxruntime on one calibration input).

Deterministic: the calibration prompts, seeds and the onnxruntime sessions (one thread) are
fixed, so two runs write identical files.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np
import onnx
from onnx import numpy_helper
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "generator")
QUANTIZED_OP_TYPES = ["Conv", "MatMul", "Gemm"]
# Gather with a float weight table: the text encoder's token and position embeddings.
EMBEDDING_OP_TYPES = ["Gather"]
MODES = ("qdq", "dynamic", "f16")
MAX_LENGTH = 77
# diffusers' defaults when vae_decoder/config.json leaves them out
LATENT_CHANNELS = 4
VAE_SCALE = 8

# Diverse enough to exercise the text encoder's vocabulary and the cross-attentions.
CALIBRATION_PROMPTS = [
    "a red apple on a tree",
    "a blue car in the sun, highly detailed",
    "portrait of an old man with a beard, oil painting",
    "a mountain lake at dawn, fog, photograph",
    "a cat sleeping on a sofa",
    "city street at night with neon lights",
    "",
    "an astronaut riding a horse on the moon",
]
CALIBRATION_NEGATIVE = "blurry, dark"
CALIBRATION_SEED = 1000


def session(path: Path | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def input_types(sess: ort.InferenceSession) -> dict[str, tuple[str, list]]:
    return {i.name: (i.type, list(i.shape)) for i in sess.get_inputs()}


# ---------------------------------------------------------------------------
# Running a bundle with onnxruntime (calibration data, reference pictures)


@dataclass
class Recorder:
    """Every feed each component received, in call order."""

    feeds: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)

    def record(self, component: str, feed: dict[str, np.ndarray]) -> None:
        self.feeds.setdefault(component, []).append({k: np.array(v) for k, v in feed.items()})


class OrtBundle:
    """A diffusion or GAN bundle run with onnxruntime, following the bundle contract
    (README of tools/fixtures): input names and dtypes from the graphs, scheduler from
    scheduler_config.json, diffusers' torch.randn noise."""

    def __init__(self, bundle: Path, recorder: Recorder | None = None):
        self.bundle = bundle
        self.recorder = recorder
        manifest = bundle / "edgegen.toml"
        self.manifest = tomllib.loads(manifest.read_text()) if manifest.is_file() else {}
        self.sessions = {c: session(bundle / c / "model.onnx") for c in COMPONENTS
                         if (bundle / c / "model.onnx").is_file()}

    def run(self, component: str, feed: dict[str, np.ndarray]) -> np.ndarray:
        if self.recorder is not None:
            self.recorder.record(component, feed)
        return self.sessions[component].run(None, feed)[0]

    @property
    def is_gan(self) -> bool:
        return self.manifest.get("kind") == "gan"

    def defaults(self) -> dict:
        return self.manifest.get("defaults", {})

    def tokenize(self, prompts: list[str]) -> np.ndarray:
        from transformers import CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(str(self.bundle / "tokenizer"))
        ids = np.array([tok(p, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
                        for p in prompts])
        ids_type = input_types(self.sessions["text_encoder"])["input_ids"][0]
        return ids.astype(np.int32 if ids_type == "tensor(int32)" else np.int64)

    def embed(self, prompts: list[str]) -> np.ndarray:
        return self.run("text_encoder", {"input_ids": self.tokenize(prompts)})

    def generate(self, prompt: str, seed: int, steps: int | None = None, guidance: float | None = None,
                 width: int | None = None, height: int | None = None,
                 negative_prompt: str | None = None) -> np.ndarray:
        """One picture, HWC float32 in [0, 1] (GAN: the first image of a batch of one)."""
        if self.is_gan:
            return self._generate_gan(prompt, seed)
        return self._generate_diffusion(prompt, seed, steps, guidance, width, height, negative_prompt)

    def _scheduler(self):
        import diffusers

        config = json.loads((self.bundle / "scheduler" / "scheduler_config.json").read_text())
        return getattr(diffusers, config["_class_name"]).from_config(config)

    def _generate_diffusion(self, prompt, seed, steps, guidance, width, height, negative_prompt):
        import torch
        from diffusers import LatentConsistencyModelPipeline

        defaults = self.defaults()
        unet_config = json.loads((self.bundle / "unet" / "config.json").read_text())
        vae_config = json.loads((self.bundle / "vae_decoder" / "config.json").read_text())
        channels = vae_config.get("latent_channels", LATENT_CHANNELS)
        blocks = vae_config.get("block_out_channels")
        vae_scale = 2 ** (len(blocks) - 1) if blocks else VAE_SCALE
        default_size = unet_config.get("sample_size", 64) * vae_scale
        steps = steps or defaults.get("steps", 4)
        guidance = defaults.get("guidance", 7.5) if guidance is None else guidance
        width = width or defaults.get("width", default_size)
        height = height or defaults.get("height", default_size)

        unet_types = input_types(self.sessions["unet"])
        is_lcm = "timestep_cond" in unet_types
        cfg = guidance > 1.0 and not is_lcm
        prompts = ([negative_prompt or ""] if cfg else []) + [prompt]
        embeds = self.embed(prompts)

        scheduler = self._scheduler()
        scheduler.set_timesteps(steps)
        generator = torch.Generator("cpu").manual_seed(seed)
        shape = (1, channels, height // vae_scale, width // vae_scale)
        latents = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
        params = inspect.signature(scheduler.step).parameters
        step_kwargs = {"generator": generator} if "generator" in params else {}
        if "eta" in params:
            step_kwargs["eta"] = 0.0
        extra = {}
        if is_lcm:
            w = torch.tensor(guidance - 1.0).repeat(1)
            extra["timestep_cond"] = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
                None, w, embedding_dim=unet_types["timestep_cond"][1][1]).numpy()

        denoised = None
        for t in scheduler.timesteps:
            model_input = torch.cat([latents] * 2) if cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            feed = {
                "sample": model_input.numpy().astype(np.float32),
                "timestep": timestep_feed(float(t), *unet_types["timestep"], model_input.shape[0]),
                "encoder_hidden_states": embeds,
                **extra,
            }
            noise = torch.from_numpy(self.run("unet", feed))
            if cfg:
                uncond, text = noise.chunk(2)
                noise = uncond + guidance * (text - uncond)
            out = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)
            latents = out[0]
            if is_lcm:
                denoised = out[1]
        final = denoised if is_lcm else latents
        scaling = vae_config.get("scaling_factor", 0.18215)
        shift = vae_config.get("shift_factor") or 0.0
        latent = (final / scaling + shift).numpy().astype(np.float32)
        decoded = self.run("vae_decoder", {"latent_sample": latent})
        return np.clip(decoded / 2 + 0.5, 0.0, 1.0)[0].transpose(1, 2, 0)

    def _generate_gan(self, prompt: str, seed: int) -> np.ndarray:
        import torch

        gan = self.manifest["gan"]
        generator = torch.Generator("cpu").manual_seed(seed)
        z = torch.randn((1, gan["latent_dim"]), generator=generator) * gan.get("truncation", 1.0)
        feed = {gan["latent_input"]: z.numpy()}
        if gan.get("class_input"):
            feed[gan["class_input"]] = np.array([seed % len(gan["classes"])], dtype=np.int64)
        if gan.get("text_input"):
            feed[gan["text_input"]] = self.embed([prompt])
        image = self.run("generator", feed)
        lo, hi = gan.get("output_range", [-1.0, 1.0])
        return np.clip((image - lo) / (hi - lo), 0.0, 1.0)[0].transpose(1, 2, 0)


def timestep_feed(t: float, input_type: str, input_shape: list, batch: int) -> np.ndarray:
    """The UNet's timestep input as its graph declares it (rank 0 or [batch]; float or int64)."""
    dtype = np.int64 if input_type == "tensor(int64)" else np.float32
    value = round(t) if dtype == np.int64 else t
    if len(input_shape) == 0:
        return np.array(value, dtype=dtype)
    return np.full((batch,), value, dtype=dtype)


def calibration_prompts(args) -> list[str]:
    if args.calibration_prompts:
        lines = args.calibration_prompts.read_text(encoding="utf-8").splitlines()
        return [line for line in lines if line.strip()][:args.prompts]
    return CALIBRATION_PROMPTS[:args.prompts]


def calibration_feeds(bundle: Path, prompts: list[str], steps: int | None, size: int | None) -> Recorder:
    """Run the bundle's pipeline on the calibration prompts and keep every component input."""
    recorder = Recorder()
    runner = OrtBundle(bundle, recorder)
    for i, prompt in enumerate(prompts):
        negative = CALIBRATION_NEGATIVE if i % 2 else None
        runner.generate(prompt, CALIBRATION_SEED + i, steps=steps, width=size, height=size,
                        negative_prompt=negative)
    return recorder


class FeedReader(CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


# ---------------------------------------------------------------------------
# Converting one ONNX file


def name_nodes(model: onnx.ModelProto) -> None:
    """The quantizer derives new node and tensor names from node names; unnamed nodes would clash."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


def compact_names(model: onnx.ModelProto, float_weights: set[str]) -> None:
    """Short tensor names; node names are dropped (as in the float bundles).

    The quantizer's generated names ("..._QuantizeLinear_Output", "..._zero_point") are a fifth of
    a tiny model's bytes. Intermediate tensors become v0, v1, ...; scales and zero points q0,
    q1, ...; a quantized weight takes back the float weight's name; graph inputs/outputs keep
    theirs.
    """
    graph = model.graph
    io_names = {v.name for v in graph.input} | {v.name for v in graph.output}
    renamed: dict[str, str] = {}
    for init in graph.initializer:
        base = init.name.removesuffix("_quantized")
        if init.name in float_weights or init.name in io_names:
            continue
        if base != init.name and base in float_weights:
            renamed[init.name] = base
        else:
            renamed[init.name] = f"q{len(renamed)}"
    count = 0
    for node in graph.node:
        for name in node.output:
            if name and name not in io_names:
                renamed[name] = f"v{count}"
                count += 1
    for init in graph.initializer:
        init.name = renamed.get(init.name, init.name)
    for node in graph.node:
        node.input[:] = [renamed.get(n, n) for n in node.input]
        node.output[:] = [renamed.get(n, n) for n in node.output]
        node.name = ""
    del graph.value_info[:]


def sort_topologically(model: onnx.ModelProto) -> None:
    """The float16 converter appends its Cast nodes at the end; ONNX wants producers first."""
    graph = model.graph
    available = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise RuntimeError("graph has a cycle or an undefined tensor")
        ready_ids = {id(n) for n in ready}
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if id(n) not in ready_ids]
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)


def qdq_op_types(args) -> list[str]:
    return QUANTIZED_OP_TYPES + ([] if args.float_embeddings else EMBEDDING_OP_TYPES)


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMuls of two activations (attention's Q K^T and softmax V): they have no weight to
    shrink and 8-bit softmax probabilities cost accuracy, so they stay float. (onnxruntime's
    MatMulConstBOnly option does not apply to the QDQ format.)"""
    weights = {t.name for t in model.graph.initializer}
    constants = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] not in weights | constants]


def nodes_using(model: onnx.ModelProto, pattern: str | None) -> list[str]:
    """Nodes that read a weight whose name matches the regular expression `pattern`."""
    if not pattern:
        return []
    regex = re.compile(pattern)
    weights = {t.name for t in model.graph.initializer if regex.search(t.name)}
    return [n.name for n in model.graph.node if weights.intersection(n.input)]


# Layers that stay float by default (qdq mode), from a per-layer sensitivity scan of the tiny
# UNet (quantizing one Conv at a time): the UNet's first conv, whose 8-bit output error flows
# through the skip connections straight to the output, and the up blocks' 1x1 shortcut convs,
# whose input is the concatenation of the skip and the upsampled path: two ranges under one
# activation scale (the "shortcut" problem Q-Diffusion describes). Together a few thousand weights.
DEFAULT_KEEP_FLOAT = r"\bconv_in\.|\bconv_out\.|up_blocks\.\d+\.resnets\.\d+\.conv_shortcut\."

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}


def quantize_qdq(src: Path, dst: Path, feeds: list[dict], args) -> None:
    model = onnx.load(str(src))
    name_nodes(model)
    excluded = activation_matmuls(model) + nodes_using(model, args.keep_float)
    # QOperator: QLinearConv / QLinearMatMul (standard ONNX ops) for Conv and MatMul only; for
    # Gemm, Gather, Add, ... onnxruntime would write its own contrib ops, which tract cannot run.
    op_types = ["Conv", "MatMul"] if args.qoperator else qdq_op_types(args)
    quantize_static(
        model,
        str(dst),
        FeedReader(feeds),
        quant_format=QuantFormat.QOperator if args.qoperator else QuantFormat.QDQ,
        op_types_to_quantize=op_types,
        per_channel=args.per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CALIBRATION_METHODS[args.calibration],
        nodes_to_exclude=excluded,
    )


def quantize_dyn(src: Path, dst: Path, per_channel: bool, conv: bool) -> None:
    model = onnx.load(str(src))
    name_nodes(model)
    op_types = ["MatMul", "Gemm"] + (["Conv"] if conv else [])
    quantize_dynamic(model, str(dst), op_types_to_quantize=op_types, per_channel=per_channel,
                     weight_type=QuantType.QInt8)


def convert_f16(src: Path, dst: Path) -> None:
    onnx.save(to_f16(onnx.load(str(src))), str(dst))


def to_f16(model: onnx.ModelProto, shape_inference: bool = True) -> onnx.ModelProto:
    """float16 weights and compute, inputs and outputs kept float32 (onnxruntime's converter).
    shape_inference=False for models above protobuf's 2 GB, which it cannot serialize."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=not shape_inference)
    f32_resize_inputs(converted)
    return converted


def f32_resize_inputs(model: onnx.ModelProto) -> int:
    """Turns float16 Constant nodes feeding a Resize's roi / scales back into float32, as ONNX types them.

    Without shape inference (which protobuf cannot do above 2 GB) onnxruntime's converter turns those
    constants into float16 too (the SD UNet's Upsample2D scales), and onnxruntime and tract then both reject
    the file."""
    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    fixed = 0
    for node in model.graph.node:
        if node.op_type != "Resize":
            continue
        for name in node.input[1:3]:
            const = constants.get(name)
            if const is None:
                continue
            for attr in const.attribute:
                if attr.name == "value" and attr.t.data_type == onnx.TensorProto.FLOAT16:
                    value = numpy_helper.to_array(attr.t).astype(np.float32)
                    attr.t.CopyFrom(numpy_helper.from_array(value, attr.t.name))
                    fixed += 1
    return fixed


def convert(src: Path, dst: Path, mode: str, feeds: list[dict] | None, args) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        if mode == "qdq":
            quantize_qdq(src, raw, feeds or [], args)
        elif mode == "dynamic":
            quantize_dyn(src, raw, args.per_channel, args.dynamic_conv)
        else:
            convert_f16(src, raw)
        model = onnx.load(str(raw))
    sort_topologically(model)
    compact_names(model, {t.name for t in onnx.load(str(src)).graph.initializer})
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


# ---------------------------------------------------------------------------
# The bundle


def copy_non_onnx(bundle: Path, out: Path) -> None:
    for path in sorted(bundle.rglob("*")):
        rel = path.relative_to(bundle)
        if path.is_dir() or path.suffix in (".onnx", ".onnx_data") or rel.name == "quantization.json":
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out / rel)


def label_manifest(out: Path, label: str) -> None:
    """Appends the weight format to the manifest's display name (the manifest has no other key for it)."""
    manifest = out / "edgegen.toml"
    if not manifest.is_file():
        return
    lines = manifest.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("name = ") and label not in line:
            name = line[len("name = "):].strip()
            if name.startswith('"') and name.endswith('"'):
                lines[i] = f'name = "{name[1:-1]} ({label})"\n'
            break
    manifest.write_text("".join(lines))


def max_diff_on(src: Path, dst: Path, feed: dict[str, np.ndarray]) -> float:
    want = session(src).run(None, feed)[0]
    got = session(dst).run(None, feed)[0]
    return float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def quantize_bundle(bundle: Path, out: Path, args) -> dict:
    components = [c for c in COMPONENTS if (bundle / c / "model.onnx").is_file()]
    if args.components:
        unknown = set(args.components) - set(components)
        if unknown:
            raise SystemExit(f"{bundle}: no component {sorted(unknown)} (has {components})")
        components = [c for c in components if c in args.components]
    if not components:
        raise SystemExit(f"{bundle}: no */model.onnx found")
    if out.resolve() == bundle.resolve():
        raise SystemExit("OUT must differ from BUNDLE")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    copy_non_onnx(bundle, out)

    # Feeds recorded from the float bundle: calibration data for qdq, and one check input per component.
    # qdq calibrates on all prompts; the other modes only need one input per component to check.
    recorder = calibration_feeds(bundle, calibration_prompts(args)[:args.prompts if args.mode == "qdq" else 1],
                                 args.steps, args.size)
    report = {"mode": args.mode, "source": bundle.name, "components": {}}
    for component in COMPONENTS:
        src = bundle / component / "model.onnx"
        if not src.is_file():
            continue
        dst = out / component / "model.onnx"
        feeds = recorder.feeds.get(component, [])
        if component in components:
            print(f"{component}: {args.mode} ({len(feeds)} calibration inputs)", file=sys.stderr)
            convert(src, dst, args.mode, feeds, args)
        else:
            shutil.copyfile(src, dst)
        entry = {"converted": component in components, "bytes_f32": src.stat().st_size,
                 "bytes": dst.stat().st_size}
        if component in components and feeds:
            entry["max_abs_diff_vs_f32"] = float(f"{max_diff_on(src, dst, feeds[0]):.3g}")
        report["components"][component] = entry

    label = {"qdq": "int8", "dynamic": "int8 dynamic", "f16": "f16"}[args.mode]
    label_manifest(out, label)
    report["options"] = {
        "per_channel": args.per_channel,
        "dynamic_conv": args.dynamic_conv,
        "qoperator": args.qoperator,
        "calibration": args.calibration,
        "keep_float": args.keep_float,
        "op_types": (["Conv", "MatMul"] if args.qoperator else qdq_op_types(args)) if args.mode == "qdq" else
        (["MatMul", "Gemm"] + (["Conv"] if args.dynamic_conv else []) if args.mode == "dynamic" else "all"),
        "calibration_prompts": calibration_prompts(args) if args.mode == "qdq" else [],
        "calibration_steps": args.steps, "calibration_size": args.size,
        "onnxruntime": ort.__version__,
    }
    (out / "quantization.json").write_text(json.dumps(report, indent=2) + "\n")
    report["bundle_bytes"] = dir_bytes(out)
    report["bundle_bytes_f32"] = dir_bytes(bundle)
    return report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="float32 bundle directory")
    parser.add_argument("out", type=Path, help="directory to write the converted bundle to (replaced)")
    parser.add_argument("--mode", choices=MODES, default="qdq")
    parser.add_argument("--components", type=lambda s: s.split(","), default=None,
                        help="comma-separated components to convert (default: all); others are copied")
    parser.add_argument("--per-channel", action="store_true",
                        help="one weight scale per output channel (more accurate, larger scale tensors)")
    parser.add_argument("--dynamic-conv", action="store_true",
                        help="dynamic mode: also quantize Conv (ConvInteger); default keeps Conv float")
    parser.add_argument("--float-embeddings", action="store_true",
                        help="qdq mode: keep Gather weight tables (text embeddings) float32")
    parser.add_argument("--qoperator", action="store_true",
                        help="qdq mode: write onnxruntime's QOperator format (QLinearConv, QLinearMatMul) "
                        "for Conv and MatMul instead of QDQ pairs")
    parser.add_argument("--calibration", choices=sorted(CALIBRATION_METHODS), default="minmax",
                        help="qdq mode: how activation ranges are chosen from the calibration data")
    parser.add_argument("--keep-float", metavar="REGEX", default=DEFAULT_KEEP_FLOAT,
                        help="qdq mode: leave float the nodes whose weight name matches REGEX "
                        "(default: %(default)s; '' quantizes every Conv/MatMul/Gemm)")
    parser.add_argument("--prompts", type=int, default=4,
                        help="calibration prompts (max 8 of the built-in ones)")
    parser.add_argument("--calibration-prompts", type=Path, metavar="FILE",
                        help="calibration prompts, one per line, instead of the built-in ones")
    parser.add_argument("--steps", type=int, default=None, help="calibration steps (default: bundle's)")
    parser.add_argument("--size", type=int, default=None, help="calibration picture size (default: bundle's)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    report = quantize_bundle(args.bundle, args.out, args)
    ratio = report["bundle_bytes"] / report["bundle_bytes_f32"]
    print(json.dumps(report["components"], indent=2))
    print(f"{args.out}: {report['bundle_bytes']} bytes, {ratio:.3f}x of {args.bundle} ({report['bundle_bytes_f32']})")


if __name__ == "__main__":
    main()
