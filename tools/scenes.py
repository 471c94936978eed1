"""A procedural clip-art world: seeded scenes on a plain light background, with captions.

Every scene is a list of objects (kind, colour, box) drawn as flat-coloured silhouettes with dark-grey
details below or inside them (trunk, wheels, stems, door) on a light background, so the scene checker (tools/check_scenes.py) can
find them again by colour segmentation. Captions come from a small grammar:

    count scene      "a red apple", "two blue balls", "three yellow suns"
    relation scene   "a red apple on a green tree", "a blue car left of an orange house", ...

Relations (A rel B): "on" (A rests on B's top edge, touching), "above" / "below" (A vertically separated
from B by a gap, roughly the same column), "left of" / "right of" (A horizontally separated from B),
"next to" (side by side, close). The two objects of a relation scene always have different colours.

Held-out combinations (tools/heldout.json, written by `python tools/scenes.py --write-heldout`) are never
produced by `sample_caption(..., split="train")`: some colour-object pairs and some
object-relation-object triples. The evaluation prompts listed there all contain one of them.

Deterministic: `render(spec, seed)` and `sample_caption(rng)` depend only on their arguments.

Run: /work/venv/bin/python tools/scenes.py [--write-heldout] [--grid out.png]
"""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

OBJECTS = ("apple", "tree", "sun", "house", "car", "ball", "cloud", "flower")
PLURALS = {o: o + "s" for o in OBJECTS}
COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 80, 215),
    "yellow": (235, 200, 20),
    "orange": (245, 130, 15),
    "purple": (140, 50, 180),
}
DETAIL = (60, 60, 60)  # trunks, wheels, stems, doors: dark grey, never a caption colour
HIGHLIGHT = (250, 250, 250)  # windows, the ball's shine
RELATIONS = ("on", "above", "below", "left of", "right of", "next to")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
WORD_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}

# Width / height of each object's box relative to its size parameter (the box's longer side).
ASPECT = {
    "apple": (1.0, 1.0), "tree": (0.7, 1.0), "sun": (1.0, 1.0), "house": (0.9, 1.0),
    "car": (1.0, 0.62), "ball": (1.0, 1.0), "cloud": (1.0, 0.6), "flower": (0.7, 1.0),
}

HELDOUT_PATH = Path(__file__).resolve().parent / "heldout.json"

# Fixed held-out choices: one colour-object pair per colour, and some object-relation-object triples.
HELDOUT_PAIRS = (
    ("red", "car"), ("green", "ball"), ("blue", "flower"),
    ("yellow", "house"), ("orange", "cloud"), ("purple", "apple"),
)
HELDOUT_TRIPLES = (
    ("apple", "on", "car"), ("ball", "above", "house"), ("sun", "below", "cloud"),
    ("tree", "left of", "flower"), ("car", "right of", "tree"), ("cloud", "next to", "sun"),
    ("flower", "on", "house"), ("house", "next to", "ball"),
)


@dataclass
class Obj:
    kind: str
    colour: str
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # x0, y0, x1, y1 in pixels (exclusive ends)


@dataclass
class Scene:
    """What a caption asks for: groups of (count, colour, kind) and an optional relation between groups 0 and 1."""

    groups: list[tuple[int, str, str]]
    relation: str | None = None
    objects: list[Obj] = field(default_factory=list)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def group_phrase(count: int, colour: str, kind: str) -> str:
    if count == 1:
        return f"{article(colour)} {colour} {kind}"
    return f"{COUNT_WORDS[count]} {colour} {PLURALS[kind]}"


def caption(scene: Scene) -> str:
    parts = [group_phrase(*g) for g in scene.groups]
    if scene.relation is None:
        return parts[0]
    return f"{parts[0]} {scene.relation} {parts[1]}"


def parse_caption(text: str) -> Scene:
    """The inverse of `caption`; raises ValueError on anything outside the grammar."""
    words = text.lower().strip().rstrip(".").split()
    singular = {p: o for o, p in PLURALS.items()}

    def group(i: int) -> tuple[tuple[int, str, str], int]:
        if i + 3 > len(words):
            raise ValueError(f"caption too short: {text!r}")
        count = WORD_COUNTS.get(words[i])
        colour, noun = words[i + 1], words[i + 2]
        if count is None or colour not in COLOURS:
            raise ValueError(f"not a caption of this world: {text!r}")
        kind = noun if noun in OBJECTS else singular.get(noun)
        if kind is None:
            raise ValueError(f"unknown object {noun!r} in {text!r}")
        return (count, colour, kind), i + 3

    first, i = group(0)
    if i == len(words):
        return Scene([first])
    rel = words[i]
    if rel in ("left", "right", "next"):
        rel = f"{words[i]} {words[i + 1]}"
        i += 2
    else:
        i += 1
    if rel not in RELATIONS:
        raise ValueError(f"unknown relation {rel!r} in {text!r}")
    second, i = group(i)
    if i != len(words):
        raise ValueError(f"trailing words in {text!r}")
    return Scene([first, second], rel)


# ---------------------------------------------------------------------------
# Caption sampling


def load_heldout() -> dict:
    return json.loads(HELDOUT_PATH.read_text(encoding="utf-8"))


def is_heldout(scene: Scene) -> bool:
    pairs = set(HELDOUT_PAIRS)
    if any((c, k) in pairs for _, c, k in scene.groups):
        return True
    if scene.relation is not None:
        return (scene.groups[0][2], scene.relation, scene.groups[1][2]) in set(HELDOUT_TRIPLES)
    return False


def random_scene(rng: random.Random, relation_share: float = 0.6, max_count: int = 3) -> Scene:
    if rng.random() >= relation_share:
        return Scene([(rng.randint(1, max_count), rng.choice(list(COLOURS)), rng.choice(OBJECTS))])
    c1, c2 = rng.sample(list(COLOURS), 2)
    return Scene([(1, c1, rng.choice(OBJECTS)), (1, c2, rng.choice(OBJECTS))], rng.choice(RELATIONS))


def sample_scene(rng: random.Random, split: str = "train", **kwargs) -> Scene:
    """split "train": never a held-out combination; "heldout": always one; "any": no filter."""
    while True:
        scene = random_scene(rng, **kwargs)
        if split == "any" or (split == "train") != is_heldout(scene):
            return scene


def single_object_scene(colour: str, kind: str) -> Scene:
    return Scene([(1, colour, kind)])


# ---------------------------------------------------------------------------
# Layout


def box_size(kind: str, size: float) -> tuple[int, int]:
    aw, ah = ASPECT[kind]
    return max(4, round(size * aw)), max(4, round(size * ah))


def _overlaps(a, b, gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _inside(b, W: int, H: int, margin: int = 1) -> bool:
    return b[0] >= margin and b[1] >= margin and b[2] <= W - margin and b[3] <= H - margin


def layout(scene: Scene, rng: random.Random, W: int, H: int) -> list[Obj]:
    """Place the scene's objects; retries until a placement satisfies the caption."""
    unit = min(W, H)
    for _ in range(1000):
        objs = _try_layout(scene, rng, W, H, unit)
        if objs is not None:
            return objs
    raise RuntimeError(f"cannot lay out {caption(scene)!r} in {W}x{H}")


def _try_layout(scene: Scene, rng: random.Random, W: int, H: int, unit: int):
    if scene.relation is None:
        count, colour, kind = scene.groups[0]
        # One object may be big; several share the canvas.
        lo, hi = {1: (0.30, 0.45), 2: (0.25, 0.36), 3: (0.22, 0.30)}[count]
        size = rng.uniform(lo, hi) * unit
        w, h = box_size(kind, size)
        boxes = []
        for _ in range(count):
            for _ in range(200):
                x, y = rng.randint(1, W - w - 1), rng.randint(1, H - h - 1)
                b = (x, y, x + w, y + h)
                if all(not _overlaps(b, o, 4) for o in boxes):
                    boxes.append(b)
                    break
            else:
                return None
        return [Obj(kind, colour, b) for b in boxes]

    (_, ca, ka), (_, cb, kb) = scene.groups
    rel = scene.relation
    sa, sb = rng.uniform(0.22, 0.32) * unit, rng.uniform(0.26, 0.38) * unit
    wa, ha = box_size(ka, sa)
    wb, hb = box_size(kb, sb)
    xb, yb = rng.randint(1, W - wb - 1), rng.randint(1, H - hb - 1)
    bcx, bcy = xb + wb / 2, yb + hb / 2
    if rel == "on":
        cx = bcx + rng.uniform(-0.2, 0.2) * wb
        y1 = yb + rng.randint(0, 1)  # A's bottom on (or one pixel into) B's top edge
        a = (round(cx - wa / 2), y1 - ha, round(cx - wa / 2) + wa, y1)
    elif rel in ("above", "below"):
        gap = rng.randint(4, 12)
        cx = bcx + rng.uniform(-0.15, 0.15) * wb
        x0 = round(cx - wa / 2)
        if rel == "above":
            a = (x0, yb - gap - ha, x0 + wa, yb - gap)
        else:
            a = (x0, yb + hb + gap, x0 + wa, yb + hb + gap + ha)
    else:
        side = rel if rel != "next to" else rng.choice(["left of", "right of"])
        gap = rng.randint(5, 14) if rel != "next to" else rng.randint(1, 3)
        cy = bcy + rng.uniform(-0.1, 0.1) * hb
        if rel == "next to":  # side by side: bottoms roughly level
            y0 = yb + hb - ha + rng.randint(-1, 1)
        else:
            y0 = round(cy - ha / 2)
        if side == "left of":
            a = (xb - gap - wa, y0, xb - gap, y0 + ha)
        else:
            a = (xb + wb + gap, y0, xb + wb + gap + wa, y0 + ha)
    b = (xb, yb, xb + wb, yb + hb)
    if not (_inside(a, W, H) and _inside(b, W, H)):
        return None
    return [Obj(kb, cb, b), Obj(ka, ca, a)]  # B first: A is drawn over it ("on")


# ---------------------------------------------------------------------------
# Drawing (at SS x resolution, then box-filtered down: smooth edges, exact flat colours inside)

SS = 4


def _jitter(rgb, rng: random.Random, amount: int = 12):
    return tuple(int(min(255, max(0, v + rng.randint(-amount, amount)))) for v in rgb)


def draw_object(d: ImageDraw.ImageDraw, obj: Obj, rgb, rng: random.Random) -> None:
    x0, y0, x1, y1 = (v * SS for v in obj.box)
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2

    def ell(ax0, ay0, ax1, ay1, fill):
        d.ellipse([ax0, ay0, ax1, ay1], fill=fill)

    k = obj.kind
    if k == "apple":
        # two lobes at the top, a dark stem and a leaf sticking out to the right
        ell(x0, y0 + 0.22 * h, x0 + 0.62 * w, y1, rgb)
        ell(x0 + 0.38 * w, y0 + 0.22 * h, x1, y1, rgb)
        ell(x0 + 0.12 * w, y0 + 0.4 * h, x1 - 0.12 * w, y1, rgb)
        d.rectangle([cx - 0.06 * w, y0, cx + 0.06 * w, y0 + 0.3 * h], fill=rgb)  # stem
        d.polygon([(cx + 0.05 * w, y0 + 0.15 * h), (x1 - 0.05 * w, y0), (cx + 0.25 * w, y0 + 0.22 * h)], fill=rgb)
    elif k == "ball":
        ell(x0, y0, x1, y1, rgb)
        ell(x0 + 0.22 * w, y0 + 0.18 * h, x0 + 0.45 * w, y0 + 0.41 * h, HIGHLIGHT)
    elif k == "sun":
        r_in, r_out = 0.3 * w, 0.5 * w
        for i in range(8):
            a = i * math.pi / 4
            pts = [
                (cx + r_out * math.cos(a), cy + r_out * math.sin(a)),
                (cx + r_in * 0.9 * math.cos(a + 0.32), cy + r_in * 0.9 * math.sin(a + 0.32)),
                (cx + r_in * 0.9 * math.cos(a - 0.32), cy + r_in * 0.9 * math.sin(a - 0.32)),
            ]
            d.polygon(pts, fill=rgb)
        ell(cx - r_in, cy - r_in, cx + r_in, cy + r_in, rgb)
    elif k == "tree":
        d.rectangle([cx - 0.12 * w, y0 + 0.7 * h, cx + 0.12 * w, y1], fill=DETAIL)
        for i, (top, bot, half) in enumerate([(0.0, 0.4, 0.32), (0.18, 0.58, 0.42), (0.36, 0.76, 0.5)]):
            d.polygon([(cx, y0 + top * h), (cx - half * w, y0 + bot * h), (cx + half * w, y0 + bot * h)], fill=rgb)
    elif k == "house":
        d.polygon([(cx, y0), (x0, y0 + 0.42 * h), (x1, y0 + 0.42 * h)], fill=rgb)
        d.rectangle([x0 + 0.1 * w, y0 + 0.42 * h, x1 - 0.1 * w, y1], fill=rgb)
        d.rectangle([cx - 0.12 * w, y0 + 0.66 * h, cx + 0.12 * w, y1], fill=DETAIL)
    elif k == "car":
        d.polygon([(x0 + 0.25 * w, y0 + 0.42 * h), (x0 + 0.35 * w, y0), (x0 + 0.7 * w, y0),
                   (x0 + 0.82 * w, y0 + 0.42 * h)], fill=rgb)
        d.rounded_rectangle([x0, y0 + 0.38 * h, x1, y0 + 0.8 * h], radius=0.12 * h, fill=rgb)
        d.rectangle([x0 + 0.4 * w, y0 + 0.12 * h, x0 + 0.62 * w, y0 + 0.38 * h], fill=HIGHLIGHT)
        for wx in (0.25, 0.75):
            ell(x0 + (wx - 0.13) * w, y1 - 0.4 * h, x0 + (wx + 0.13) * w, y1, DETAIL)
    elif k == "cloud":
        ell(x0, y0 + 0.35 * h, x0 + 0.45 * w, y1, rgb)
        ell(x0 + 0.2 * w, y0, x0 + 0.65 * w, y0 + 0.8 * h, rgb)
        ell(x0 + 0.5 * w, y0 + 0.2 * h, x1, y1, rgb)
        d.rectangle([x0 + 0.2 * w, y0 + 0.6 * h, x0 + 0.8 * w, y1], fill=rgb)
    elif k == "flower":
        d.rectangle([cx - 0.06 * w, y0 + 0.5 * h, cx + 0.06 * w, y1], fill=DETAIL)
        hy = y0 + 0.33 * h
        r = 0.2 * w
        for i in range(5):
            a = -math.pi / 2 + i * 2 * math.pi / 5
            px, py = cx + 0.28 * w * math.cos(a), hy + 0.28 * w * math.sin(a)
            ell(px - r, py - r, px + r, py + r, rgb)
        ell(cx - 0.12 * w, hy - 0.12 * w, cx + 0.12 * w, hy + 0.12 * w, DETAIL)
    else:
        raise ValueError(f"unknown object {k!r}")


def background(rng: random.Random):
    base = rng.randint(225, 245)
    return tuple(base + rng.randint(-6, 6) for _ in range(3))


def render_scene(scene: Scene, seed: int, size: int = 64) -> tuple[np.ndarray, Scene]:
    """Lay out and draw `scene`; returns an HxWx3 uint8 image and the scene with object boxes filled in."""
    rng = random.Random(seed)
    objs = layout(scene, rng, size, size)
    img = Image.new("RGB", (size * SS, size * SS), background(rng))
    d = ImageDraw.Draw(img)
    for obj in objs:
        draw_object(d, obj, _jitter(COLOURS[obj.colour], rng), rng)
    img = img.resize((size, size), Image.BOX)
    return np.asarray(img), Scene(scene.groups, scene.relation, objs)


def render_portrait(colour: str, kind: str, seed: int, size: int = 64) -> np.ndarray:
    """One large object near the centre (the GAN's training pictures): box 50-65% of the canvas, +-3 px."""
    rng = random.Random(seed)
    w, h = box_size(kind, rng.uniform(0.5, 0.65) * size)
    x0 = (size - w) // 2 + rng.randint(-3, 3)
    y0 = (size - h) // 2 + rng.randint(-3, 3)
    img = Image.new("RGB", (size * SS, size * SS), background(rng))
    draw_object(ImageDraw.Draw(img), Obj(kind, colour, (x0, y0, x0 + w, y0 + h)), _jitter(COLOURS[colour], rng), rng)
    return np.asarray(img.resize((size, size), Image.BOX))


def render(text: str, seed: int, size: int = 64) -> np.ndarray:
    return render_scene(parse_caption(text), seed, size)[0]


def training_example(index: int, seed: int = 0, size: int = 64, split: str = "train") -> tuple[np.ndarray, str]:
    """Example number `index` of a seeded stream: the same (image, caption) every time."""
    rng = random.Random(seed * 1_000_003 + index)
    scene = sample_scene(rng, split)
    img, _ = render_scene(scene, rng.randrange(1 << 30), size)
    return img, caption(scene)


# ---------------------------------------------------------------------------
# Held-out list and evaluation prompts


def heldout_prompts(n: int = 240, seed: int = 2024) -> list[str]:
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        text = caption(sample_scene(rng, "heldout"))
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def write_heldout() -> None:
    doc = {
        "description": "Combinations never shown in training (tools/scenes.py). The evaluation prompts each contain "
                       "a held-out colour-object pair or object-relation-object triple.",
        "colour_object_pairs": [list(p) for p in HELDOUT_PAIRS],
        "object_relation_object": [list(t) for t in HELDOUT_TRIPLES],
        "gan_heldout_classes": [f"{c} {k}" for c, k in HELDOUT_PAIRS],
        "eval_prompts": heldout_prompts(),
    }
    HELDOUT_PATH.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def grid(texts: list[str], seed: int, cols: int = 8, size: int = 64) -> Image.Image:
    rows = math.ceil(len(texts) / cols)
    out = Image.new("RGB", (cols * size, rows * size), (255, 255, 255))
    for i, t in enumerate(texts):
        out.paste(Image.fromarray(render(t, seed + i, size)), ((i % cols) * size, (i // cols) * size))
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--write-heldout" in args:
        write_heldout()
        print(f"wrote {HELDOUT_PATH}")
    if "--grid" in args:
        path = args[args.index("--grid") + 1]
        rng = random.Random(0)
        texts = [caption(sample_scene(rng, "any")) for _ in range(32)]
        grid(texts, 0).save(path)
        print("\n".join(texts))
