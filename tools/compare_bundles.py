"""PSNR between the pictures two bundles make for the same prompts and seeds, through the edgegen
binary (e.g. a quantized bundle against its float32 original):

    /work/venv/bin/python tools/compare_bundles.py scenes-gan scenes-gan-int8 --gan-classes --seeds 2
    /work/venv/bin/python tools/compare_bundles.py tiny-random-sd tiny-random-sd-int8 --prompts "a red apple" --seeds 4

Runs `target/release/edgegen generate --model ID --prompt P --seed S` for both bundles (models.dir
from --models-dir), compares the 8-bit pictures and prints the mean, median and lowest PSNR
(identical pictures count as 99 dB). --json writes every pair's figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def generate(args, model: str, prompt: str, seed: int, out: Path) -> np.ndarray:
    env = {"EDGEGEN_MODELS_DIR": str(args.models_dir), "EDGEGEN_LOG": "warn", "PATH": "/usr/bin:/bin"}
    subprocess.run([args.binary, "generate", "--model", model, "--prompt", prompt, "--seed", str(seed),
                    "--output", str(out)], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def gan_prompts(models_dir: Path, model: str) -> list[str]:
    manifest = tomllib.loads((models_dir / model / "edgegen.toml").read_text(encoding="utf-8"))
    return [f"a {c}" for c in manifest["gan"]["classes"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--models-dir", type=Path, default=ROOT / "models")
    p.add_argument("--prompts", nargs="*", default=[])
    p.add_argument("--gan-classes", action="store_true", help="one prompt per class of bundle A")
    p.add_argument("--seeds", type=int, default=2, help="seeds 1..N per prompt")
    p.add_argument("--binary", default=str(ROOT / "target" / "release" / "edgegen"))
    p.add_argument("--json", default="")
    args = p.parse_args()
    prompts = list(args.prompts) + (gan_prompts(args.models_dir, args.a) if args.gan_classes else [])
    if not prompts:
        sys.exit("no prompts: give --prompts or --gan-classes")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for prompt in prompts:
            for seed in range(1, args.seeds + 1):
                a = generate(args, args.a, prompt, seed, Path(tmp) / "a.png")
                b = generate(args, args.b, prompt, seed, Path(tmp) / "b.png")
                rows.append({"prompt": prompt, "seed": seed, "psnr_db": round(psnr(a, b), 2)})
    values = np.array([r["psnr_db"] for r in rows])
    summary = {"a": args.a, "b": args.b, "pictures": len(rows), "mean_psnr_db": round(float(values.mean()), 2),
               "median_psnr_db": round(float(np.median(values)), 2), "min_psnr_db": round(float(values.min()), 2)}
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
