"""Captioned sample grid made with the real edgegen binary, each picture scored by the scene checker.

    /work/venv/bin/python tools/sample_grid.py --model models/scenes-gan --out docs/images/scenes-gan-grid.png \
        --prompts "a red apple" "a blue car" ...
    /work/venv/bin/python tools/sample_grid.py --model models/scenes-sd --heldout 16 --steps 4 --out grid.png

Runs `target/release/edgegen generate --model M --prompt P --seed S --output ...` for every prompt
(seed = --seed + index), runs tools/check_scenes.py on each picture and writes a grid with the
caption under each picture and the checker's verdict (ok / no) in its corner, scaled up 2x for reading.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))
import check_scenes  # noqa: E402
import scenes  # noqa: E402


def generate(binary: Path, model: str, prompt: str, seed: int, out: Path, steps: int | None) -> np.ndarray:
    cmd = [str(binary), "generate", "--model", model, "--prompt", prompt, "--seed", str(seed), "--output", str(out)]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return np.asarray(Image.open(out).convert("RGB"))


def checked_caption(prompt: str) -> str:
    """The caption to check: the prompt itself when it is in the scene grammar, else (a GAN prompt such as
    "a red apple on a tree") the one colour-object class it names, as "a red apple"."""
    try:
        scenes.parse_caption(prompt)
        return prompt
    except ValueError:
        words = re.sub(r"[^a-z ]", " ", prompt.lower()).split()
        for a, b in zip(words, words[1:]):
            if a in scenes.COLOURS and b in scenes.OBJECTS:
                return scenes.group_phrase(1, a, b)
        raise


def verdict(r: dict) -> str:
    return "ok" if r["full"] else "no"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--prompts", nargs="*", default=[])
    p.add_argument("--heldout", type=int, default=0, help="also the first N held-out evaluation prompts")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cols", type=int, default=4)
    p.add_argument("--binary", default=str(ROOT / "target" / "release" / "edgegen"))
    args = p.parse_args()
    prompts = list(args.prompts) + scenes.load_heldout()["eval_prompts"][: args.heldout]
    scale, label_h = 2, 30
    tiles, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, prompt in enumerate(prompts):
            # a note in brackets ("(held out)") is shown under the picture, not sent
            sent = re.sub(r"\s*\(.*?\)", "", prompt)
            pic = generate(Path(args.binary), args.model, sent, args.seed + i, Path(tmp) / f"{i}.png", args.steps)
            r = check_scenes.check(pic, checked_caption(sent))
            results.append({"prompt": prompt, "seed": args.seed + i, "full": r["full"], "detected": r["detected"]})
            tile = Image.new("RGB", (pic.shape[1] * scale, pic.shape[0] * scale + label_h), (255, 255, 255))
            tile.paste(Image.fromarray(pic).resize((pic.shape[1] * scale, pic.shape[0] * scale), Image.NEAREST))
            d = ImageDraw.Draw(tile)
            words, lines, line = prompt.split(), [], ""
            for w in words:  # wrap to the tile width (~21 characters of the default font at 128 px)
                if len(line) + len(w) + 1 > 21:
                    lines.append(line)
                    line = w
                else:
                    line = f"{line} {w}".strip()
            lines.append(line)
            text = "\n".join(lines[:2])
            d.multiline_text((2, pic.shape[0] * scale + 1), text, fill=(0, 0, 0), spacing=1)
            d.text((tile.width - 6 * len(verdict(r)) - 2, 2), verdict(r),
                   fill=(0, 120, 0) if r["full"] else (200, 0, 0))
            tiles.append(tile)
    cols = args.cols
    rows = (len(tiles) + cols - 1) // cols
    w, h = tiles[0].size
    grid = Image.new("RGB", (cols * w + (cols - 1) * 4, rows * h + (rows - 1) * 4), (200, 200, 200))
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % cols) * (w + 4), (i // cols) * (h + 4)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(json.dumps({"full_match": float(np.mean([r["full"] for r in results])), "n": len(results)}))
    for r in results:
        print(("ok  " if r["full"] else "NO  ") + r["prompt"], r["detected"])


if __name__ == "__main__":
    main()
