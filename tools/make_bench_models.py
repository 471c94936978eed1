"""Stand-alone ONNX files of the real Stable Diffusion components, for tools/bench_vs_ort.py.

    /work/venv/bin/python tools/make_bench_models.py OUT_DIR [--only NAME ...] [--no-int8] [--f16] [--list]

Each model is architecture-true (the public diffusers / transformers configuration written out
below, nothing downloaded) with seeded random weights, exported the way the fixture bundles are
(tools/fixtures/bundle_io.py: opset 17, TorchScript exporter, dynamic batch and spatial axes,
compact tensor names). Timing and memory do not depend on the weights' values.

OUT_DIR/<name>/ receives
  model.onnx (+ model.onnx.data when the weights exceed protobuf's 2 GB limit),
  bench.json: what it is, its parameter count and the input shapes to bench, each input written
              the way `edgegen bench --onnx FILE --input NAME=SPEC` takes it.

`<name>-int8` variants are QDQ int8 (Conv and MatMul only, static, MinMax calibration on a few
seeded random inputs; tools/quantize.py's code and its default float-kept layers); with --f16,
`<name>-f16` variants hold float16 weights and compute (inputs and outputs stay float32,
onnxruntime's converter as tools/quantize.py uses it). The bundled
models under models/ are copied as they are. Existing outputs are skipped: the script resumes.

Cost: the SD 2.1 / 1.5 UNets (865 / 860 M parameters, 3.5 GB in float32) need ~16 GB of RAM,
~8 GB of disk each with their int8 variant, and a long time on 2 cores; OpenCLIP ViT-H (354 M)
about a third of that. Everything else takes seconds to a few minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

import quantize  # noqa: E402
from fixtures import bundle_io as io  # noqa: E402

PROTOBUF_LIMIT = 2**31 - 1
SEED = 0
CLIP_VOCAB = 49408
TOKENS = 77

# --- Public configurations (diffusers / transformers config.json of each model) ---------------

SD21_UNET = dict(  # stabilityai/sd-turbo and stable-diffusion-2-1(-base): unet/config.json
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
)
SD15_UNET = dict(  # stable-diffusion-v1-5: unet/config.json
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
BK_SDM_TINY_UNET = dict(  # nota-ai/bk-sdm-tiny (SD 1.5 without the mid block and the 4th stage,
    # one resnet+attention pair per down stage): 323 M parameters, as the BK-SDM paper states.
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(320, 640, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3,
    mid_block_type=None, cross_attention_dim=768, attention_head_dim=8,
)
SD_VAE = dict(  # the SD 1.x / 2.x AutoencoderKL: vae/config.json
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=512, scaling_factor=0.18215,
)
TAESD = dict(  # madebyollin/taesd: diffusers AutoencoderTiny's defaults are TAESD's configuration
    in_channels=3, out_channels=3, latent_channels=4,
    encoder_block_out_channels=(64, 64, 64, 64), decoder_block_out_channels=(64, 64, 64, 64),
    num_encoder_blocks=(1, 3, 3, 3), num_decoder_blocks=(3, 3, 3, 1),
    latent_magnitude=3, latent_shift=0.5, upsampling_scaling_factor=2, act_fn="relu", scaling_factor=1.0,
)
CLIP_VIT_L14_TEXT = dict(  # openai/clip-vit-large-patch14, SD 1.5's text_encoder/config.json
    vocab_size=CLIP_VOCAB, hidden_size=768, intermediate_size=3072, projection_dim=768,
    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=TOKENS,
    hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)
OPENCLIP_VIT_H_TEXT = dict(  # SD 2.x / SD-Turbo text_encoder/config.json (OpenCLIP ViT-H/14, 23 of 24
    # layers: SD 2 takes the penultimate layer's output)
    vocab_size=CLIP_VOCAB, hidden_size=1024, intermediate_size=4096, projection_dim=512,
    num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=TOKENS,
    hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)

# Latent sizes to bench: 512x512 and 256x256 pictures (the VAE scales by 8).
PICTURES = (512, 256)
BUNDLED_SD = ("tiny-random-sd", "tiny-random-sd-int8", "scenes-sd", "scenes-sd-int8")


@dataclass
class Spec:
    name: str
    component: str
    description: str
    build: Callable[[Path], int] | None  # exports model.onnx, returns the parameter count
    shapes: list[dict]  # [{"label": "512x512", "inputs": {name: "1x4x64x64", ...}}]
    calibration: Callable[[], list[dict[str, np.ndarray]]] | None = None
    big: bool = False
    tags: list[str] = field(default_factory=list)


# --- Export -------------------------------------------------------------------------------------


def fits_in_protobuf(model: onnx.ModelProto) -> bool:
    """Recent protobuf releases refuse to even measure a message above 2 GB."""
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    if weights >= PROTOBUF_LIMIT:
        return False
    try:
        return model.ByteSize() < PROTOBUF_LIMIT
    except Exception:  # google.protobuf.message.EncodeError
        return False


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Inline below protobuf's 2 GB limit, else one external data file next to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fits_in_protobuf(model):
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
        return
    data = path.name + ".data"
    (path.parent / data).unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)
    onnx.checker.check_model(str(path))


def export(module, args, path: Path, input_names, output_names, dynamic_axes) -> None:
    """bundle_io.export_onnx, through a scratch directory: above 2 GB the exporter writes one
    file per weight, which are gathered into a single `model.onnx.data`."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "model.onnx"
        with torch.no_grad():
            torch.onnx.export(module, args, str(raw), input_names=list(input_names),
                              output_names=list(output_names), dynamic_axes=dynamic_axes,
                              opset_version=io.OPSET, do_constant_folding=True, dynamo=False)
        model = onnx.load(str(raw))
    io.compact_names(model.graph, keep_node_names=io.KEEP_NODE_NAMES)
    save_model(model, path)


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class _Unet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def export_unet(config: dict, hidden: int) -> Callable[[Path], int]:
    def build(path: Path) -> int:
        from diffusers import UNet2DConditionModel

        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(**config).eval()
        args = (torch.randn(1, 4, 32, 32), torch.tensor(500.0), torch.randn(1, TOKENS, hidden))
        export(_Unet(unet), args, path,
               input_names=["sample", "timestep", "encoder_hidden_states"], output_names=["out_sample"],
               dynamic_axes={"sample": {0: "batch_size", 2: "height", 3: "width"},
                             "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
                             "out_sample": {0: "batch_size", 2: "height", 3: "width"}})
        return params(unet)
    return build


class _Decoder(torch.nn.Module):
    """What optimum exports as vae_decoder: latents (already divided by the scaling factor) to
    pixels in [-1, 1]; for AutoencoderKL that includes post_quant_conv."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


def export_decoder(kind: str, config: dict) -> Callable[[Path], int]:
    def build(path: Path) -> int:
        import diffusers

        torch.manual_seed(SEED)
        vae = getattr(diffusers, kind)(**config).eval()
        export(_Decoder(vae), (torch.randn(1, 4, 32, 32),), path,
               input_names=["latent_sample"], output_names=["sample"],
               dynamic_axes={"latent_sample": {0: "batch_size", 2: "height", 3: "width"},
                             "sample": {0: "batch_size", 2: "height", 3: "width"}})
        return params(vae.decoder) + (params(vae.post_quant_conv) if hasattr(vae, "post_quant_conv") else 0)
    return build


def export_text(config: dict) -> Callable[[Path], int]:
    def build(path: Path) -> int:
        from transformers import CLIPTextConfig, CLIPTextModel

        text_config = CLIPTextConfig(**config, attn_implementation="eager")
        torch.manual_seed(SEED)
        model = CLIPTextModel(text_config).eval()
        ids = torch.full((1, TOKENS), config["pad_token_id"], dtype=torch.int32)
        ids[0, 0], ids[0, 5] = config["bos_token_id"], config["eos_token_id"]
        export(io._LastHiddenState(model), (ids,), path, input_names=["input_ids"],
               output_names=["last_hidden_state"],
               dynamic_axes={"input_ids": {0: "batch_size", 1: "sequence_length"},
                             "last_hidden_state": {0: "batch_size", 1: "sequence_length"}})
        return params(model)
    return build


def copy_bundled(relative: str) -> Callable[[Path], int]:
    def build(path: Path) -> int:
        src = REPO / "models" / relative
        shutil.copyfile(src, path)
        model = onnx.load(str(src))
        return sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    return build


# --- Shapes and calibration inputs ----------------------------------------------------------------


def unet_shapes(hidden: int, pictures=PICTURES, channels: int = 4, factor: int = 8) -> list[dict]:
    return [{"label": f"{p}x{p}", "inputs": {"sample": f"1x{channels}x{p // factor}x{p // factor}",
                                             "timestep": "scalar",
                                             "encoder_hidden_states": f"1x{TOKENS}x{hidden}"}}
            for p in pictures]


def with_guidance_input(shapes: list[dict], cond_dim: int | None) -> list[dict]:
    """An LCM-distilled UNet (time_cond_proj_dim set) takes the guidance embedding as `timestep_cond`."""
    if cond_dim:
        for shape in shapes:
            shape["inputs"]["timestep_cond"] = f"1x{cond_dim}"
    return shapes


def decoder_shapes(pictures=PICTURES, channels: int = 4, factor: int = 8) -> list[dict]:
    return [{"label": f"{p}x{p}", "inputs": {"latent_sample": f"1x{channels}x{p // factor}x{p // factor}"}}
            for p in pictures]


def text_shapes(vocab: int, dtype: str) -> list[dict]:
    return [{"label": f"{TOKENS} tokens", "inputs": {"input_ids": f"1x{TOKENS}:{dtype}:{vocab}"}}]


def rng() -> np.random.Generator:
    return np.random.default_rng(SEED)


def unet_feeds(hidden: int, latent: int = 32, count: int = 2) -> Callable[[], list[dict]]:
    def feeds():
        r = rng()
        return [{"sample": r.standard_normal((1, 4, latent, latent), dtype=np.float32),
                 "timestep": np.array(t, dtype=np.float32),
                 "encoder_hidden_states": r.standard_normal((1, TOKENS, hidden), dtype=np.float32)}
                for t in np.linspace(999, 1, count)]
    return feeds


def decoder_feeds(latent: int = 32, count: int = 2) -> Callable[[], list[dict]]:
    def feeds():
        r = rng()
        # Latents divided by SD's scaling factor 0.18215 are roughly N(0, 5.5).
        return [{"latent_sample": (r.standard_normal((1, 4, latent, latent)) * 5.5).astype(np.float32)}
                for _ in range(count)]
    return feeds


def text_feeds(vocab: int, count: int = 2) -> Callable[[], list[dict]]:
    def feeds():
        r = rng()
        return [{"input_ids": r.integers(0, vocab, (1, TOKENS), dtype=np.int32)} for _ in range(count)]
    return feeds


# --- The catalogue ----------------------------------------------------------------------------


def catalogue() -> list[Spec]:
    specs = [
        Spec("sd-turbo-unet", "unet", "SD-Turbo / SD 2.1 UNet (865 M)", export_unet(SD21_UNET, 1024),
             unet_shapes(1024), unet_feeds(1024), big=True),
        Spec("sd15-unet", "unet", "Stable Diffusion 1.5 UNet (860 M)", export_unet(SD15_UNET, 768),
             unet_shapes(768), unet_feeds(768), big=True),
        Spec("bk-sdm-tiny-unet", "unet", "BK-SDM-Tiny UNet (323 M; tiny-sd size)",
             export_unet(BK_SDM_TINY_UNET, 768), unet_shapes(768), unet_feeds(768)),
        Spec("sd-vae-decoder", "vae_decoder", "SD VAE decoder (AutoencoderKL, 49 M)",
             export_decoder("AutoencoderKL", SD_VAE), decoder_shapes(), decoder_feeds()),
        Spec("taesd-decoder", "vae_decoder", "TAESD decoder (AutoencoderTiny, 1.2 M)",
             export_decoder("AutoencoderTiny", TAESD), decoder_shapes(), decoder_feeds()),
        Spec("clip-vit-l14-text", "text_encoder", "CLIP ViT-L/14 text encoder (SD 1.5, 123 M)",
             export_text(CLIP_VIT_L14_TEXT), text_shapes(CLIP_VOCAB, "i32"), text_feeds(CLIP_VOCAB)),
        Spec("openclip-vit-h-text", "text_encoder", "OpenCLIP ViT-H/14 text encoder (SD 2.x, 23 layers, 340 M)",
             export_text(OPENCLIP_VIT_H_TEXT), text_shapes(CLIP_VOCAB, "i32"), text_feeds(CLIP_VOCAB), big=True),
    ]
    specs += [spec for bundle in BUNDLED_SD for spec in bundled_sd(bundle)]
    specs.append(Spec("scenes-gan-generator", "generator", "bundled models/scenes-gan generator",
                      copy_bundled("scenes-gan/generator/model.onnx"),
                      [{"label": "64x64", "inputs": {"z": "1x32", "class_label": "1:i64:48"}}],
                      tags=["bundled"]))
    return specs


def bundled_sd(bundle: str) -> list[Spec]:
    """The bundled diffusion models at 64x64, the size their manifests default to; latent channels, the
    decoder's upscaling, the text width and the vocabulary come from the bundle's configs."""
    def config(component: str) -> dict:
        return json.loads((REPO / "models" / bundle / component / "config.json").read_text())

    unet, vae, text = config("unet"), config("vae_decoder"), config("text_encoder")
    channels, factor = unet["in_channels"], 2 ** (len(vae["block_out_channels"]) - 1)
    desc = f"bundled models/{bundle}"
    return [
        Spec(f"{bundle}-text", "text_encoder", f"{desc} text encoder", copy_bundled(f"{bundle}/text_encoder/model.onnx"),
             text_shapes(text["vocab_size"], "i64"), tags=["bundled"]),
        Spec(f"{bundle}-unet", "unet", f"{desc} UNet", copy_bundled(f"{bundle}/unet/model.onnx"),
             with_guidance_input(unet_shapes(unet["cross_attention_dim"], (64,), channels, factor),
                                 unet.get("time_cond_proj_dim")), tags=["bundled"]),
        Spec(f"{bundle}-vae-decoder", "vae_decoder", f"{desc} VAE decoder",
             copy_bundled(f"{bundle}/vae_decoder/model.onnx"), decoder_shapes((64,), channels, factor),
             tags=["bundled"]),
    ]


# --- int8 ----------------------------------------------------------------------------------------


def quantize_int8(src: Path, dst: Path, feeds: list[dict]) -> None:
    """QDQ int8 for Conv and MatMul (tools/quantize.py's static path restricted to those two
    op types): weights int8, activations uint8, activation x activation MatMuls (attention) and
    tools/quantize.py's DEFAULT_KEEP_FLOAT layers left float."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    large = sum(p.stat().st_size for p in src.parent.glob("model.onnx*")) >= PROTOBUF_LIMIT
    model = onnx.load(str(src))
    float_weights = {t.name for t in model.graph.initializer}
    quantize.name_nodes(model)
    excluded = quantize.activation_matmuls(model) + quantize.nodes_using(model, quantize.DEFAULT_KEEP_FLOAT)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        raw = Path(tmp) / "model.onnx"
        quantize_static(model, str(raw), quantize.FeedReader(feeds), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["Conv", "MatMul"], per_channel=False,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded,
                        use_external_data_format=large)
        del model
        quantized = onnx.load(str(raw))
    quantize.sort_topologically(quantized)
    quantize.compact_names(quantized, float_weights)
    save_model(quantized, dst)


def convert_f16(src: Path, dst: Path) -> None:
    model = onnx.load(str(src))
    converted = quantize.to_f16(model, shape_inference=fits_in_protobuf(model))
    del model
    quantize.sort_topologically(converted)  # the converter appends the input casts last
    save_model(converted, dst)


# --- Driver ---------------------------------------------------------------------------------------


def write_sidecar(out: Path, spec: Spec, parameters: int, quantization: str, source: str) -> None:
    doc = {
        "name": out.name,
        "component": spec.component,
        "description": spec.description,
        "source": source,
        "parameters": parameters,
        "quantization": quantization,
        "file": "model.onnx",
        "shapes": spec.shapes,
    }
    (out / "bench.json").write_text(json.dumps(doc, indent=2) + "\n")


def make_f16(spec: Spec, root: Path) -> None:
    fout = root / f"{spec.name}-f16"
    if (fout / "bench.json").is_file():
        print(f"{fout.name}: exists, skipped", file=sys.stderr)
        return
    print(f"{fout.name}: converting", file=sys.stderr)
    convert_f16(root / spec.name / "model.onnx", fout / "model.onnx")
    parameters = json.loads((root / spec.name / "bench.json").read_text())["parameters"]
    write_sidecar(fout, spec, parameters, "float16", f"{spec.name} converted")
    print(f"{fout.name}: {dir_mb(fout):.0f} MB", file=sys.stderr)


def make(spec: Spec, root: Path, int8: bool) -> None:
    out = root / spec.name
    sidecar = out / "bench.json"
    if sidecar.is_file():
        print(f"{spec.name}: exists, skipped", file=sys.stderr)
    else:
        out.mkdir(parents=True, exist_ok=True)
        print(f"{spec.name}: exporting", file=sys.stderr)
        parameters = spec.build(out / "model.onnx")
        source = "copied from models/" if "bundled" in spec.tags else "random weights (seed 0), public config"
        write_sidecar(out, spec, parameters, "float32" if "int8" not in spec.name else "int8 (QDQ)", source)
        print(f"{spec.name}: {parameters / 1e6:.1f} M parameters, {dir_mb(out):.0f} MB", file=sys.stderr)
    if not (int8 and spec.calibration):
        return
    qout = root / f"{spec.name}-int8"
    if (qout / "bench.json").is_file():
        print(f"{qout.name}: exists, skipped", file=sys.stderr)
        return
    qout.mkdir(parents=True, exist_ok=True)
    print(f"{qout.name}: quantizing", file=sys.stderr)
    quantize_int8(out / "model.onnx", qout / "model.onnx", spec.calibration())
    parameters = json.loads(sidecar.read_text())["parameters"]
    write_sidecar(qout, spec, parameters, "int8 (QDQ, Conv/MatMul)", f"{spec.name} quantized")
    print(f"{qout.name}: {dir_mb(qout):.0f} MB", file=sys.stderr)


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 1e6


def main() -> None:
    specs = catalogue()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=[s.name for s in specs],
                        help="models to make (default: all)")
    parser.add_argument("--skip-big", action="store_true", help="leave out the SD UNets and ViT-H")
    parser.add_argument("--no-int8", action="store_true", help="no int8 variants")
    parser.add_argument("--f16", action="store_true", help="also float16 variants")
    parser.add_argument("--list", action="store_true", help="list the models and exit")
    args = parser.parse_args()
    if args.list:
        for s in specs:
            print(f"{s.name:28} {s.component:13} {'big ' if s.big else ''}{s.description}")
        return
    io.setup_torch()
    warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        if args.only and spec.name not in args.only:
            continue
        if args.skip_big and spec.big:
            continue
        make(spec, args.out_dir, not args.no_int8)
        if args.f16:
            make_f16(spec, args.out_dir)


if __name__ == "__main__":
    main()
