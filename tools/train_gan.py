"""Train the class-conditional scene GAN (class = colour x object) and export it as a GAN bundle.

Data: single large, roughly centred objects of tools/scenes.py (render_portrait) at 64x64, 42 of the 48 colour-object classes (the held-out pairs of
tools/heldout.json are never shown). Generator: [z, colour embedding, object embedding] -> 4x4 ->
four (nearest 2x upsample + 3x3 conv + BatchNorm + ReLU) -> 64x64 RGB in [-1, 1]. Discriminator:
strided convolutions with spectral norm, hinge loss with a projection term per attribute, plus
auxiliary colour and object classifiers (AC-GAN) on real pictures whose answers the generator must
also earn on its own pictures. The exported generator is the exponential moving average of the
trained one, its BatchNorm statistics re-measured. The colour and object embeddings are separate,
so the held-out classes get a generator input too (the composed embedding of a pair never seen).

CPU, one thread, seeded; checkpoints every few minutes to <run_dir>/ckpt.pt and resumes from there:

    nohup /work/venv/bin/python tools/train_gan.py train --run /work/train/gan --steps 6000 &
    /work/venv/bin/python tools/train_gan.py export --run /work/train/gan --out models/scenes-gan
    /work/venv/bin/python tools/train_gan.py sample --run /work/train/gan        # grid PNG in the run dir
    /work/venv/bin/python tools/train_gan.py eval --out models/scenes-gan        # scene checker on the bundle
    /work/venv/bin/python tools/train_gan.py references --out models/scenes-gan \
        --dest tests/fixtures/bundled/scenes-gan                                     # regression test pictures
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import spectral_norm

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(TOOLS / "fixtures"))
import scenes  # noqa: E402
import training  # noqa: E402

COLOURS = list(scenes.COLOURS)
OBJECTS = list(scenes.OBJECTS)
CLASSES = [f"{c} {o}" for c in COLOURS for o in OBJECTS]  # class index = colour * 8 + object
HELDOUT = {f"{c} {o}" for c, o in scenes.HELDOUT_PAIRS}
TRAIN_CLASSES = [i for i, name in enumerate(CLASSES) if name not in HELDOUT]
LATENT_DIM = 32
SIZE = 64
SEED = 7


class Generator(nn.Module):
    def __init__(self, latent_dim: int = LATENT_DIM, ch: int = 64):
        super().__init__()
        self.latent_dim = latent_dim
        self.colour_embed = nn.Embedding(len(COLOURS), 16)
        self.object_embed = nn.Embedding(len(OBJECTS), 16)
        self.ch = ch
        self.fc = nn.Linear(latent_dim + 32, ch * 2 * 4 * 4)
        self.fc_norm = nn.BatchNorm2d(ch * 2)
        chans = [ch * 2, ch * 2, ch, ch // 2, ch // 4]  # 4 -> 8 -> 16 -> 32 -> 64
        blocks = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            blocks += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU()]
        self.net = nn.Sequential(*blocks)
        self.head = nn.Conv2d(chans[-1], 3, 3, padding=1)

    def condition(self, colour, obj):
        return torch.cat([self.colour_embed(colour), self.object_embed(obj)], dim=1)

    def forward_cond(self, z, cond):
        h = self.fc(torch.cat([z, cond], dim=1)).reshape(z.shape[0], self.ch * 2, 4, 4)
        h = torch.relu(self.fc_norm(h))
        return torch.tanh(self.head(self.net(h)))

    def forward(self, z, colour, obj):
        return self.forward_cond(z, self.condition(colour, obj))


class Discriminator(nn.Module):
    def __init__(self, ch: int = 32):
        super().__init__()
        chans = [3, ch // 2, ch, ch * 2, ch * 4]  # 64 -> 32 -> 16 -> 8 -> 4
        layers = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [spectral_norm(nn.Conv2d(c_in, c_out, 4, 2, 1)), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers)
        feat = ch * 4
        self.out = spectral_norm(nn.Linear(feat, 1))
        self.colour_proj = spectral_norm(nn.Embedding(len(COLOURS), feat))
        self.object_proj = spectral_norm(nn.Embedding(len(OBJECTS), feat))
        self.colour_cls = nn.Linear(feat, len(COLOURS))
        self.object_cls = nn.Linear(feat, len(OBJECTS))

    def forward(self, x, colour, obj):
        h = self.net(x).sum(dim=(2, 3))
        score = self.out(h)[:, 0] + (self.colour_proj(colour) * h).sum(1) + (self.object_proj(obj) * h).sum(1)
        return score, self.colour_cls(h), self.object_cls(h)


class ExportedGenerator(nn.Module):
    """What goes into the bundle: z [batch, latent_dim], class_label int64 [batch] -> image [batch, 3, 64, 64]."""

    def __init__(self, gen: Generator):
        super().__init__()
        self.gen = gen
        colour = torch.arange(len(CLASSES)) // len(OBJECTS)
        obj = torch.arange(len(CLASSES)) % len(OBJECTS)
        with torch.no_grad():
            table = gen.condition(colour, obj)
        self.register_buffer("class_table", table)

    def forward(self, z, class_label):
        return self.gen.forward_cond(z, self.class_table[class_label])


# ---------------------------------------------------------------------------
# Data


def render_class(class_index: int, seed: int) -> np.ndarray:
    colour, obj = CLASSES[class_index].split(" ")
    return scenes.render_portrait(colour, obj, seed, SIZE)


def build_dataset(path: Path, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    if path.is_file():
        data = np.load(path)
        return data["images"], data["labels"]
    images, labels = [], []
    for k in TRAIN_CLASSES:
        for i in range(per_class):
            images.append(render_class(k, 1_000_000 + k * per_class + i))
            labels.append(k)
    images, labels = np.stack(images), np.array(labels, dtype=np.int64)
    np.savez(path, images=images, labels=labels)
    return images, labels


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def split_label(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return labels // len(OBJECTS), labels % len(OBJECTS)


# ---------------------------------------------------------------------------
# Training


def train(args) -> None:
    torch.set_num_threads(1)
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    images, labels = build_dataset(run / "data.npz", args.per_class)
    torch.manual_seed(SEED)
    gen, disc = Generator(), Discriminator()
    ema = copy.deepcopy(gen).eval()
    opt_g = torch.optim.Adam(gen.parameters(), 2e-4, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), 2e-4, betas=(0.0, 0.9))
    ckpt = run / "ckpt.pt"
    step, wall = training.resume(ckpt, {"gen": gen, "disc": disc, "ema": ema, "opt_g": opt_g, "opt_d": opt_d})
    progress = training.Progress(run, wall, args.save_seconds, every=50)
    while step < args.steps:
        # batch of step `step` depends only on the step: resuming replays the same data order
        g = torch.Generator().manual_seed(SEED * 100_003 + step)
        idx = torch.randint(len(labels), (args.batch,), generator=g)
        real = to_tensor(images[idx.numpy()])
        if torch.rand((), generator=g) < 0.5:
            real = real.flip(-1)  # mirrored objects are still the same objects
        colour, obj = split_label(torch.from_numpy(labels[idx.numpy()]))
        z = torch.randn(args.batch, LATENT_DIM, generator=g)
        fake_lab = torch.tensor(TRAIN_CLASSES)[torch.randint(len(TRAIN_CLASSES), (args.batch,), generator=g)]
        f_colour, f_obj = split_label(fake_lab)

        fake = gen(z, f_colour, f_obj)
        d_real, c_real, o_real = disc(real, colour, obj)
        d_fake, _, _ = disc(fake.detach(), f_colour, f_obj)
        aux_real = nn.functional.cross_entropy(c_real, colour) + nn.functional.cross_entropy(o_real, obj)
        loss_d = torch.relu(1 - d_real).mean() + torch.relu(1 + d_fake).mean() + aux_real
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()

        d_gen, c_gen, o_gen = disc(fake, f_colour, f_obj)
        aux_gen = nn.functional.cross_entropy(c_gen, f_colour) + nn.functional.cross_entropy(o_gen, f_obj)
        loss_g = -d_gen.mean() + aux_gen
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        training.ema_update(zip(ema.parameters(), gen.parameters()), training.warmup_decay(step))
        with torch.no_grad():
            for be, b in zip(ema.buffers(), gen.buffers()):
                be.copy_(b)
        step += 1
        progress.report(step, f"loss_d {loss_d.item():.3f} loss_g {loss_g.item():.3f} aux_real {aux_real.item():.3f} "
                              f"aux_gen {aux_gen.item():.3f}")
        progress.checkpoint(ckpt, step, args.steps, lambda: {
            "gen": gen.state_dict(), "disc": disc.state_dict(), "ema": ema.state_dict(),
            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict()})
        if step % args.sample_every == 0:
            sample_grid(ema, run / f"samples_{step:06d}.png")


def recalibrated(ema_state: dict, n: int = 2048) -> Generator:
    """The EMA generator with BatchNorm running statistics measured on its own activations."""
    gen = Generator()
    gen.load_state_dict(ema_state)
    for m in gen.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    gen.train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(n // 256):
            lab = torch.randint(len(CLASSES), (256,), generator=g)
            gen(torch.randn(256, LATENT_DIM, generator=g), *split_label(lab))
    return gen.eval()


def sample_grid(gen: Generator, path: Path, truncation: float = 1.0) -> None:
    from PIL import Image

    was_training = gen.training
    gen.eval()
    g = torch.Generator().manual_seed(0)
    lab = torch.arange(len(CLASSES))
    with torch.no_grad():
        out = gen(torch.randn(len(lab), LATENT_DIM, generator=g) * truncation, *split_label(lab))
    gen.train(was_training)
    pics = ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    grid = pics.reshape(len(COLOURS), len(OBJECTS), SIZE, SIZE, 3).transpose(0, 2, 1, 3, 4)
    Image.fromarray(grid.reshape(len(COLOURS) * SIZE, len(OBJECTS) * SIZE, 3)).save(path)


def manifest(step: int, truncation: float) -> str:
    classes = ", ".join(f'"{c}"' for c in CLASSES)
    return f"""# edgegen bundle manifest
kind = "gan"
name = "Scenes GAN (class-conditional, 64x64)"
description = \"\"\"A class-conditional generator of single clip-art objects (colour x object) from the procedural world of tools/scenes.py, trained from scratch on CPU by tools/train_gan.py ({step} steps). A prompt naming one colour and one object, such as "a red apple", selects the class. Six of the 48 classes were never shown in training (tools/heldout.json).\"\"\"
license = "Apache-2.0"

[gan]
latent_input = "z"
latent_dim = {LATENT_DIM}
class_input = "class_label"
classes = [{classes}]
output = "image"
output_range = [-1.0, 1.0]
truncation = {truncation}
"""


def export(args) -> None:
    import bundle_io as io

    io.setup_torch()
    state = torch.load(Path(args.run) / "ckpt.pt", weights_only=False)
    gen = recalibrated(state["ema"])
    wrapped = ExportedGenerator(gen).eval()
    out = Path(args.out)
    io.clean_dir(out)
    g = torch.Generator().manual_seed(0)
    example = (torch.randn(2, LATENT_DIM, generator=g), torch.tensor([0, 5], dtype=torch.int64))
    path = out / "generator" / "model.onnx"
    io.export_onnx(wrapped, example, path, ["z", "class_label"], ["image"],
                   {"z": {0: "batch_size"}, "class_label": {0: "batch_size"}, "image": {0: "batch_size"}})
    (out / "edgegen.toml").write_text(manifest(state["step"], args.truncation), encoding="utf-8")
    session = io.ort_session(path)
    z = torch.randn(4, LATENT_DIM, generator=g)
    lab = torch.tensor([0, 13, 30, 47])
    with torch.no_grad():
        want = wrapped(z, lab).numpy()
    got = session.run(["image"], {"z": z.numpy(), "class_label": lab.numpy()})[0]
    print(f"exported step {state['step']} to {out}: {io.dir_size(out)} bytes, onnx vs torch "
          f"{io.max_abs_diff(got, want):.2e}")


def sample(args) -> None:
    torch.set_num_threads(1)
    state = torch.load(Path(args.run) / "ckpt.pt", weights_only=False)
    gen = recalibrated(state["ema"])
    path = Path(args.run) / f"grid_{state['step']:06d}.png"
    sample_grid(gen, path, args.truncation)
    print(path)


def evaluate(args) -> None:
    """The exported bundle through onnxruntime, seeded like a batch-1 request: z = randn([1, latent_dim],
    Generator("cpu").manual_seed(seed)) * truncation; prompt "a <colour> <object>" checked by the scene checker."""
    import bundle_io as io
    import check_scenes

    torch.set_num_threads(1)
    out = Path(args.out)
    session = io.ort_session(out / "generator" / "model.onnx")
    rows = []
    for k, name in enumerate(CLASSES):
        for i in range(args.per_class_eval):
            seed = args.seed_base + k * 100 + i
            z = torch.randn([1, LATENT_DIM], generator=torch.Generator("cpu").manual_seed(seed)) * args.truncation
            img = session.run(["image"], {"z": z.numpy(), "class_label": np.array([k], dtype=np.int64)})[0]
            pic = np.clip((img[0].transpose(1, 2, 0) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
            colour, obj = name.split(" ")
            r = check_scenes.check(pic, scenes.group_phrase(1, colour, obj))
            labels = check_scenes.classify_pixels(pic)
            counts = np.bincount(labels[(labels >= 0) & (labels < len(COLOURS))], minlength=len(COLOURS))
            rows.append({"class": name, "heldout": name in HELDOUT, "seed": seed, **{
                key: r[key] for key in ("full", "objects", "colours", "counts")}, "detected": r["detected"],
                # the colour most of the coloured pixels have, whatever their shape
                "main_colour": bool(counts.sum() > 0 and COLOURS[int(counts.argmax())] == colour)})
            if i == 0:
                rows[-1]["picture"] = pic

    def rate(sel, key):
        return round(float(np.mean([r[key] for r in sel])), 4) if sel else None

    summary = {}
    for label, sel in (("all", rows), ("trained_classes", [r for r in rows if not r["heldout"]]),
                       ("heldout_classes", [r for r in rows if r["heldout"]])):
        summary[label] = {"n": len(sel), **{key: rate(sel, key) for key in ("colours", "objects", "main_colour",
                                                                             "full")}}
    summary["per_object"] = {o: rate([r for r in rows if r["class"].endswith(" " + o)], "colours") for o in OBJECTS}
    summary["per_colour"] = {c: rate([r for r in rows if r["class"].startswith(c + " ")], "colours") for c in COLOURS}
    summary["object_right_per_object"] = {o: rate([r for r in rows if r["class"].endswith(" " + o)], "objects")
                                          for o in OBJECTS}
    summary["main_colour_per_colour"] = {c: rate([r for r in rows if r["class"].startswith(c + " ")],
                                                  "main_colour") for c in COLOURS}
    summary["per_class"] = {name: rate([r for r in rows if r["class"] == name], "colours") for name in CLASSES}
    summary["truncation"] = args.truncation
    print(json.dumps(summary, indent=1))
    if args.eval_json:
        Path(args.eval_json).write_text(json.dumps(summary, indent=1) + "\n")
    pics = np.stack([r["picture"] for r in rows if "picture" in r])
    grid = pics.reshape(len(COLOURS), len(OBJECTS), SIZE, SIZE, 3).transpose(0, 2, 1, 3, 4)
    from PIL import Image

    Image.fromarray(grid.reshape(len(COLOURS) * SIZE, len(OBJECTS) * SIZE, 3)).save(args.grid)
    print(f"grid (rows: {', '.join(COLOURS)}; columns: {', '.join(OBJECTS)}) in {args.grid}")


REFERENCE_CASES = [("a red apple", 1), ("a blue car", 2), ("a yellow sun above a house", 3),
                   ("a green tree", 4), ("an orange flower", 5), ("a purple cloud", 6)]


def references(args) -> None:
    """Pictures of the exported bundle through onnxruntime for fixed prompts and seeds, drawn the way a
    batch-1 request draws them, for tests/bundled_models.rs. Each prompt names one colour and one object
    before anything else, which is the class edgegen picks."""
    import bundle_io as io
    import tomllib
    from PIL import Image

    out, dest = Path(args.out), Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    manifest = tomllib.loads((out / "edgegen.toml").read_text(encoding="utf-8"))
    truncation = manifest["gan"]["truncation"]
    session = io.ort_session(out / "generator" / "model.onnx")
    cases = []
    for prompt, seed in REFERENCE_CASES:
        words = prompt.split()
        colour = next(w for w in words if w in COLOURS)
        obj = next(w for w in words if w in OBJECTS)
        k = CLASSES.index(f"{colour} {obj}")
        z = torch.randn([1, LATENT_DIM], generator=torch.Generator("cpu").manual_seed(seed)) * truncation
        img = session.run(["image"], {"z": z.numpy(), "class_label": np.array([k], dtype=np.int64)})[0]
        pic = np.clip((img[0].transpose(1, 2, 0) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
        name = f"seed{seed}-{colour}-{obj}.png"
        Image.fromarray(pic).save(dest / name)
        cases.append({"prompt": prompt, "seed": seed, "class": f"{colour} {obj}", "png": name})
    (dest / "cases.json").write_text(json.dumps({
        "model": out.name, "reference": "onnxruntime on generator/model.onnx, tools/train_gan.py references",
        "cases": cases}, indent=1) + "\n", encoding="utf-8")
    print(f"{len(cases)} reference pictures in {dest}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["train", "export", "sample", "eval", "references"])
    p.add_argument("--run", default="/work/train/gan")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--per-class", type=int, default=400)
    p.add_argument("--save-seconds", type=float, default=180.0)
    p.add_argument("--sample-every", type=int, default=250)
    p.add_argument("--out", default="models/scenes-gan")
    p.add_argument("--truncation", type=float, default=1.0)
    p.add_argument("--per-class-eval", type=int, default=5)
    p.add_argument("--eval-json", default="", help="also write the summary to this file")
    p.add_argument("--grid", default="/tmp/scenes-gan-grid.png")
    p.add_argument("--dest", default="tests/fixtures/bundled/scenes-gan")
    p.add_argument("--seed-base", type=int, default=10_000,
                   help="eval seeds are seed-base + 100 * class + i (another base: a validation set)")
    args = p.parse_args()
    {"train": train, "export": export, "sample": sample, "eval": evaluate,
     "references": references}[args.command](args)


if __name__ == "__main__":
    main()
