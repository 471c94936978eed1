"""Scene checker (GenEval-style) for the clip-art world of tools/scenes.py.

For an image and its caption: are the named objects there, in the named colours and counts, and does the
named relation hold between them?

How: the background colour is the median of the border pixels; saturated pixels away from it are
assigned to the nearest caption colour by hue, dark unsaturated pixels are "detail" (trunks, wheels,
stems). Each colour's connected regions (8-connected) are objects; a tiny CNN (weights in
tools/check_scenes_cnn.npz, trained on the renderer's own regions by `--train`) names each region's
shape from its mask and the detail pixels around it, or rejects it as a fragment. An object's box is
its region's box joined with the detail regions it touches. Relations are judged on those boxes.

    /work/venv/bin/python tools/check_scenes.py --train       # (re)train the shape classifier, ~2 min, 1 thread
    /work/venv/bin/python tools/check_scenes.py --validate    # renderer / noise / blank / shuffled captions
    /work/venv/bin/python tools/check_scenes.py IMAGE.png "a red apple on a green tree"

Library: `check(image_uint8_hwc, caption) -> dict` (keys: full, objects, colours, counts, relation, ...).
"""

from __future__ import annotations

import json
import random
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenes  # noqa: E402

WEIGHTS = Path(__file__).resolve().parent / "check_scenes_cnn.npz"
COLOUR_NAMES = list(scenes.COLOURS)
CLASSES = list(scenes.OBJECTS) + ["fragment"]
CROP = 20


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees of float RGB in [0, 1], shape [..., 3]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    c = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return h * 60.0


PALETTE_HUES = _hue(np.array([scenes.COLOURS[c] for c in COLOUR_NAMES], dtype=np.float64) / 255.0)


def classify_pixels(img: np.ndarray) -> np.ndarray:
    """Per pixel: -1 background / white, 0..5 caption colour index, 6 dark detail."""
    x = img.astype(np.float64) / 255.0
    h, w, _ = x.shape
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.sqrt(((x - bg) ** 2).sum(-1))
    mx, mn = x.max(-1), x.min(-1)
    sat = (mx - mn) / np.maximum(mx, 1e-6)
    hue = _hue(x)
    d = np.abs(hue[..., None] - PALETTE_HUES[None, None, :])
    d = np.minimum(d, 360.0 - d)
    nearest = d.argmin(-1)
    labels = np.full((h, w), -1, dtype=np.int64)
    coloured = (dist > 0.18) & (sat > 0.4) & (mx > 0.35)
    labels[coloured] = nearest[coloured]
    dark = (dist > 0.18) & (mx < 0.45) & ~coloured
    labels[dark] = 6
    return labels


def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected regions of a boolean mask, each as an array of (y, x) pixel coordinates."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    ys, xs = np.nonzero(mask)
    for y0, x0 in zip(ys.tolist(), xs.tolist()):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue = deque([(y0, x0)])
        pix = []
        while queue:
            y, x = queue.popleft()
            pix.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        out.append(np.array(pix))
    return out


@dataclass
class Region:
    colour: str
    pixels: np.ndarray  # (y, x)
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), detail included
    crop: np.ndarray  # [2, CROP, CROP] float32: region mask, detail mask
    kind: str = "fragment"


def _box(pix: np.ndarray) -> tuple[int, int, int, int]:
    return int(pix[:, 1].min()), int(pix[:, 0].min()), int(pix[:, 1].max()) + 1, int(pix[:, 0].max()) + 1


def _resize(mask: np.ndarray, out: int) -> np.ndarray:
    """Area-average resize of a 2-D float array to out x out."""
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return nn.functional.interpolate(t, size=(out, out), mode="area" if mask.shape[0] >= out else "bilinear",
                                     align_corners=None if mask.shape[0] >= out else False)[0, 0].numpy()


def regions(img: np.ndarray) -> list[Region]:
    """Coloured regions of an image with their crops (not yet named)."""
    labels = classify_pixels(img)
    h, w = labels.shape
    min_area = max(6, round(8 * h * w / 4096))
    dark_map = np.full((h, w), -1, dtype=np.int64)
    darks = [p for p in components(labels == 6) if len(p) >= 2]
    for i, p in enumerate(darks):
        dark_map[p[:, 0], p[:, 1]] = i
    found = []
    for ci, name in enumerate(COLOUR_NAMES):
        for pix in components(labels == ci):
            if len(pix) < min_area:
                continue
            mask = np.zeros((h, w), dtype=bool)
            mask[pix[:, 0], pix[:, 1]] = True
            found.append((name, pix, mask))
    # A detail region belongs to the touching coloured region it meets highest up: details hang below
    # or sit inside their object (trunk, wheels, stem, door), and may rest on the object under it.
    owner_of_dark: dict[int, tuple[float, int]] = {}
    for ri, (_, _, mask) in enumerate(found):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= grown[:, :-1]
        grown[:, :-1] |= grown[:, 1:]
        contact = grown & (dark_map >= 0)
        for di in set(dark_map[contact].tolist()):
            mean_y = float(np.nonzero(contact & (dark_map == di))[0].mean())
            if di not in owner_of_dark or mean_y < owner_of_dark[di][0]:
                owner_of_dark[di] = (mean_y, ri)
    out = []
    for ri, (name, pix, mask) in enumerate(found):
        touching = [di for di, (_, owner) in owner_of_dark.items() if owner == ri]
        allpix = np.concatenate([pix] + [darks[i] for i in touching]) if touching else pix
        box = _box(allpix)
        detail = np.zeros((h, w), dtype=bool)
        for i in touching:
            detail[darks[i][:, 0], darks[i][:, 1]] = True
        out.append(Region(name, pix, box, _crop(mask, detail, box)))
    return out


def _crop(mask: np.ndarray, detail: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) + 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    sx, sy = int(round(cx - side / 2)), int(round(cy - side / 2))
    h, w = mask.shape
    pad = side + 2
    m = np.pad(mask, pad)[sy + pad: sy + pad + side, sx + pad: sx + pad + side]
    d = np.pad(detail, pad)[sy + pad: sy + pad + side, sx + pad: sx + pad + side]
    return np.stack([_resize(m, CROP), _resize(d, CROP)]).astype(np.float32)


class ShapeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(32, len(CLASSES)),
        )

    def forward(self, x):
        return self.net(x)


_NET: ShapeNet | None = None


def shape_net() -> ShapeNet:
    global _NET
    if _NET is None:
        net = ShapeNet()
        data = np.load(WEIGHTS)
        net.load_state_dict({k: torch.from_numpy(data[k]) for k in data.files})
        _NET = net.eval()
    return _NET


def detect(img: np.ndarray) -> list[Region]:
    """Named objects of an image (fragments dropped)."""
    regs = regions(img)
    if regs:
        with torch.no_grad():
            pred = shape_net()(torch.from_numpy(np.stack([r.crop for r in regs]))).argmax(1).tolist()
        for r, p in zip(regs, pred):
            r.kind = CLASSES[p]
    return [r for r in regs if r.kind != "fragment"]


# ---------------------------------------------------------------------------
# Relations


def relation_holds(rel: str, a, b) -> bool:
    """a, b: boxes (x0, y0, x1, y1). The geometric reading of each caption relation."""
    acx, acy = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
    bcx, bcy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    dx, dy = acx - bcx, acy - bcy
    vgap_above = b[1] - a[3]  # > 0: empty rows between a's bottom and b's top
    vgap_below = a[1] - b[3]
    hgap = max(b[0] - a[2], a[0] - b[2])
    if rel == "on":
        return dy < 0 and b[0] <= acx <= b[2] and -0.5 * (a[3] - a[1]) <= vgap_above <= 2
    if rel == "above":
        return vgap_above >= 3 and abs(dx) < abs(dy)
    if rel == "below":
        return vgap_below >= 3 and abs(dx) < abs(dy)
    if rel == "left of":
        return dx < 0 and abs(dx) > abs(dy) and hgap >= 0
    if rel == "right of":
        return dx > 0 and abs(dx) > abs(dy) and hgap >= 0
    if rel == "next to":
        return abs(dx) > abs(dy) and -1 <= hgap <= 6
    raise ValueError(f"unknown relation {rel!r}")


def check(img: np.ndarray, text: str, objs: list[Region] | None = None) -> dict:
    """Checker verdict for one image (HxWx3 uint8) and caption.

    objects: every named object kind is present (any colour); colours: every group has at least one object
    of its kind in its colour; counts: every group's (colour, kind) appears exactly its count; relation:
    with both groups found once, the relation holds (None for count captions); full: all of these.
    """
    scene = scenes.parse_caption(text)
    if objs is None:
        objs = detect(img)
    kinds = {o.kind for o in objs}
    found = [[o for o in objs if o.kind == k and o.colour == c] for _, c, k in scene.groups]
    res = {
        "objects": all(k in kinds for _, _, k in scene.groups),
        "colours": all(len(f) >= 1 for f in found),
        "counts": all(len(f) == n for f, (n, _, _) in zip(found, scene.groups)),
        "relation": None,
    }
    full = res["objects"] and res["colours"] and res["counts"]
    if scene.relation is not None:
        ok = len(found[0]) == 1 and len(found[1]) == 1 and relation_holds(scene.relation, found[0][0].box,
                                                                          found[1][0].box)
        res["relation"] = ok
        full = full and ok
    res["full"] = full
    res["detected"] = [f"{o.colour} {o.kind}@{o.box}" for o in objs]
    return res


# ---------------------------------------------------------------------------
# Training the shape classifier on the renderer's own regions


def _degrade(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur and noise, so the classifier also reads softer, noisier generated pictures."""
    x = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)[None]
    sigma = rng.uniform(0.0, 1.0)
    if sigma > 0.3:
        k = torch.tensor([np.exp(-0.5 * (i / sigma) ** 2) for i in (-2, -1, 0, 1, 2)], dtype=torch.float32)
        k = k / k.sum()
        x = nn.functional.conv2d(nn.functional.pad(x, (2, 2, 0, 0), mode="replicate"),
                                 k.reshape(1, 1, 1, 5).repeat(3, 1, 1, 1), groups=3)
        x = nn.functional.conv2d(nn.functional.pad(x, (0, 0, 2, 2), mode="replicate"),
                                 k.reshape(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3)
    x = x + torch.from_numpy(rng.normal(0, rng.uniform(0, 12), x.shape).astype(np.float32))
    return x[0].permute(1, 2, 0).clamp(0, 255).numpy().astype(np.uint8)


def labelled_regions(n_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(n_images):
        scene = scenes.sample_scene(rng, "any")
        img, placed = scenes.render_scene(scene, rng.randrange(1 << 30), 64)
        if i % 2:
            img = _degrade(img, nrng)
        regs = regions(img)
        # name each region after the placed object whose box holds most of its pixels
        best: dict[int, int] = {}
        owner = []
        for ri, r in enumerate(regs):
            votes = [0] * len(placed.objects)
            for oi, o in enumerate(placed.objects):
                x0, y0, x1, y1 = o.box
                inside = ((r.pixels[:, 1] >= x0 - 1) & (r.pixels[:, 1] < x1 + 1)
                          & (r.pixels[:, 0] >= y0 - 1) & (r.pixels[:, 0] < y1 + 1))
                votes[oi] = int(inside.sum()) if o.colour == r.colour else 0
            oi = int(np.argmax(votes)) if votes and max(votes) > 0 else -1
            owner.append(oi)
            if oi >= 0 and len(r.pixels) > best.get(oi, (0, -1))[0]:
                best[oi] = (len(r.pixels), ri)
        keep = {ri for _, ri in best.values()}
        for ri, r in enumerate(regs):
            oi = owner[ri]
            label = CLASSES.index(placed.objects[oi].kind) if ri in keep else len(CLASSES) - 1
            xs.append(r.crop)
            ys.append(label)
        if i % 6 == 0:  # noise pictures: whatever regions they have are fragments
            noise = nrng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            if i % 12 == 0:
                noise = _degrade(np.kron(nrng.integers(0, 256, (16, 16, 3)), np.ones((4, 4, 1))).astype(np.uint8),
                                 nrng)
            noise_regions = regions(noise)
            for j in nrng.permutation(len(noise_regions))[:6]:
                xs.append(noise_regions[j].crop)
                ys.append(len(CLASSES) - 1)
    return np.stack(xs), np.array(ys)


def train(n_images: int = 5000, epochs: int = 12, seed: int = 0) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    x, y = labelled_regions(n_images, seed)
    print(f"{len(y)} regions; per class {np.bincount(y, minlength=len(CLASSES)).tolist()}")
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    net = ShapeNet()
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        total, correct = 0.0, 0
        for i in range(0, len(y), 128):
            idx = perm[i:i + 128]
            xb = x[idx]
            if epoch % 2:  # mirror left-right (a leaf or a shine on the other side is still the object)
                xb = xb.flip(-1)
            logits = net(xb)
            loss = nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss) * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
        print(f"epoch {epoch}: loss {total / len(y):.4f} accuracy {correct / len(y):.4f}")
    np.savez(WEIGHTS, **{k: v.detach().numpy() for k, v in net.state_dict().items()})
    print(f"wrote {WEIGHTS}")


def validate(n: int = 1000, seed: int = 12345) -> dict:
    """Checker accuracy on renderer pictures (must be ≥ 98%) and on pictures that do not match (≈ 0%)."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    texts, imgs = [], []
    for _ in range(n):
        scene = scenes.sample_scene(rng, "any")
        imgs.append(scenes.render_scene(scene, rng.randrange(1 << 30), 64)[0])
        texts.append(scenes.caption(scene))
    dets = [detect(im) for im in imgs]
    res = {}

    def rate(pairs):
        rows = [check(im, t, d) for im, t, d in pairs]
        return {k: round(float(np.mean([r[k] for r in rows if r[k] is not None])), 4)
                for k in ("full", "objects", "colours", "counts", "relation")}

    res["renderer"] = rate(zip(imgs, texts, dets))
    heldout = scenes.load_heldout()["eval_prompts"]
    held_imgs = [scenes.render(t, 777 + i) for i, t in enumerate(heldout)]
    res["renderer_heldout_prompts"] = rate((im, t, None) for im, t in zip(held_imgs, heldout))
    degraded = [_degrade(im, nrng) for im in imgs[:300]]
    res["renderer_blurred_noisy"] = rate((im, t, None) for im, t in zip(degraded, texts[:300]))
    # a caption from another picture: only right where the two captions happen to agree
    shuffled = texts[1:] + texts[:1]
    res["shuffled_captions"] = rate(zip(imgs, shuffled, dets))
    noise = [nrng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(200)]
    res["uniform_noise"] = rate((im, t, None) for im, t in zip(noise, texts))
    blobs = [_degrade(np.kron(nrng.integers(0, 256, (8, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8), nrng)
             for _ in range(200)]
    res["blocky_noise"] = rate((im, t, None) for im, t in zip(blobs, texts))
    blank = [np.full((64, 64, 3), v, dtype=np.uint8) for v in np.linspace(0, 255, 200).astype(int)]
    res["blank"] = rate((im, t, None) for im, t in zip(blank, texts))
    return res


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--train"]:
        train()
    elif args[:1] == ["--validate"]:
        print(json.dumps(validate(), indent=1))
    elif len(args) == 2:
        from PIL import Image

        print(json.dumps(check(np.asarray(Image.open(args[0]).convert("RGB")), args[1]), indent=1))
    else:
        print(__doc__)
        sys.exit(2)
