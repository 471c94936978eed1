"""Random-weight UNets for measuring float32 vs int8 vs float16 in tract (docs/benchmarks.md).

    /work/venv/bin/python tools/quant_bench_models.py OUT_DIR [--size mid|sd21] [--latent 32]

Writes OUT_DIR/unet-<size>/{f32,qdq,dynamic,dynamic-conv,f16}.onnx: a diffusers UNet2DConditionModel
built from a config (seeded random weights, nothing downloaded), exported like the fixture
bundles (opset 17, TorchScript exporter, dynamic batch/height/width), then converted with
tools/quantize.py's code. QDQ calibration uses a few random inputs at the given latent size
(there is no pipeline around a lone UNet); for timing and memory that is what matters.

Sizes: `mid` is Stable Diffusion 2.1's UNet with half the channels (about a quarter of the
weights); `sd21` is the SD 2.1 / SD-Turbo UNet itself (865 M parameters, 3.5 GB in float32:
exporting and calibrating it needs ~16 GB of RAM and a long time on 2 cores).
Run the timings with `cargo run --release --example quant_bench -- FILE --latent N`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import quantize  # noqa: E402
from fixtures import bundle_io as io  # noqa: E402

SD21 = dict(
    sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
)
SIZES = {
    "sd21": SD21,
    "mid": {**SD21, "block_out_channels": (160, 320, 640, 640)},
}
HIDDEN = 1024


class _Export(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def export(size: str, path: Path, latent: int) -> None:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SIZES[size]).eval()
    params = sum(p.numel() for p in unet.parameters())
    print(f"unet-{size}: {params / 1e6:.0f} M parameters", file=sys.stderr)
    args = (torch.randn(1, 4, latent, latent), torch.tensor(500.0), torch.randn(1, 77, HIDDEN))
    io.export_onnx(
        _Export(unet), args, path,
        input_names=["sample", "timestep", "encoder_hidden_states"], output_names=["out_sample"],
        dynamic_axes={"sample": {0: "batch_size", 2: "height", 3: "width"},
                      "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
                      "out_sample": {0: "batch_size", 2: "height", 3: "width"}},
    )


def calibration_feeds(latent: int, count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{
        "sample": rng.standard_normal((1, 4, latent, latent), dtype=np.float32),
        "timestep": np.array(t, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((1, 77, HIDDEN), dtype=np.float32),
    } for t in np.linspace(999, 1, count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="mid")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--calibration-inputs", type=int, default=2)
    args = parser.parse_args()
    io.setup_torch()
    out = args.out_dir / f"unet-{args.size}"
    out.mkdir(parents=True, exist_ok=True)
    src = out / "f32.onnx"
    if not src.is_file():
        export(args.size, src, args.latent)
    feeds = calibration_feeds(args.latent, args.calibration_inputs)
    for name, options in [("dynamic", ["--mode", "dynamic"]),
                          ("dynamic-conv", ["--mode", "dynamic", "--dynamic-conv"]),
                          ("f16", ["--mode", "f16"]),
                          ("qdq", ["--mode", "qdq"])]:
        dst = out / f"{name}.onnx"
        if dst.is_file():
            continue
        qargs = quantize.parse_args(["unused", "unused", *options])
        quantize.convert(src, dst, qargs.mode, feeds, qargs)
        print(f"{dst}: {dst.stat().st_size / 1e6:.1f} MB (float32 {src.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
