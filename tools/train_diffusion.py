"""Train the small SD-shaped text-to-image model of the scene world and export it as a diffusion bundle.

Shape (Stable Diffusion's, scaled down): CLIP text encoder over the 1000-token scene tokenizer -> UNet2DConditionModel
with cross-attention -> VAE decoder -> 64x64 RGB. ARCHS lists the variants:
- "v3" (default): 4-layer, 64-wide text encoder; the latents are the 8x8x8 latents of the autoencoder trained by
  tools/train_vae.py (its slim checkpoint tools/checkpoints/scenes-vae.pt, with the latents' shift and scale);
  the bundle's vae_decoder is that autoencoder's decoder.
- "v1", "v2" (older runs): pixel space folded 4x4 into channels (space-to-depth: a 64x64x3 picture is a
  16x16x48 latent; the decoder is the exact inverse, depth-to-space, plus SHIFT/SCALE); v1 has a 2-layer,
  32-wide text encoder.

Training: v-prediction on Stable Diffusion's betas (scaled_linear 0.00085 -> 0.012, 1000 steps),
loss weights min(SNR + 1, 5) / (SNR + 1) on the v error (`--weighting v-min5`, see loss_weight), 10% empty
captions (for classifier-free guidance), AdamW, EMA of the weights.
Data: captions and pictures from tools/scenes.py, split "train" (no held-out combination), example
number n of a seeded stream, so resuming replays the same data.

CPU, one thread, seeded; checkpoints every few minutes to <run>/ckpt.pt; resumes from it:

    nohup /work/venv/bin/python tools/train_diffusion.py train --run /work/train/diffusion3 --steps 40000 &
    /work/venv/bin/python tools/train_diffusion.py export --run /work/train/diffusion3 --out models/scenes-sd
    /work/venv/bin/python tools/train_diffusion.py references --out models/scenes-sd  # tests/fixtures/bundled/
    /work/venv/bin/python tools/train_diffusion.py eval --run /work/train/diffusion3   # checker, 1/2/4/8 steps
    /work/venv/bin/python tools/train_diffusion.py slim --run /work/train/diffusion3 --out tools/checkpoints/scenes-sd.pt
    /work/venv/bin/python tools/train_diffusion.py probe --run /work/train/diffusion3 --out probe.png  # relations read?

A new run takes --arch (v3 by default) and may start its UNet from another run's checkpoint
(--init-unet PATH) and its text encoder too (--init-te PATH); resuming checks that --arch matches the checkpoint's (the first run, in
/work/train/diffusion, is v1).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np
import torch
from torch import nn

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(TOOLS / "fixtures"))
import bundle_io as io  # noqa: E402
import scenes  # noqa: E402
import training  # noqa: E402

from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor  # noqa: E402

SIZE = 64
FOLD = 4  # space-to-depth factor: latents are [48, 16, 16]
LATENT_CHANNELS = 3 * FOLD * FOLD
# Pixels in [-1, 1] have mean ~0.76 and std ~0.33 over the training pictures (mostly light background):
# latents are (pixels - SHIFT) * SCALE, so they are roughly centred with unit variance.
SHIFT = 0.76
SCALE = 3.0
SEED = 11
TOKENIZER_DIR = ROOT / "tests" / "fixtures" / "tokenizer"
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
SAMPLE_CAPTIONS = [
    "a red apple on a green tree", "a blue car left of an orange house", "two yellow suns", "a purple ball",
    "a green cloud above a red flower", "three orange balls", "a yellow house below a blue cloud",
    "a red car next to a purple tree",
]


# v1 (steps 0-17000 of the first run) read relation captions as bags of words: with one seed, the six
# relations of "a red ball REL a blue car" gave the same picture, mostly the last noun phrase's object.
# v2 widens the text side (the UNet's conv and self-attention weights can start from a v1 checkpoint).
# v1 and v2 denoise pixels folded 4x4 into 48 channels at 16x16, with cross-attention only at 8x8; full
# match rose slowly (v2: 23.8% at step 7 497) and relations stayed near 5%. v3 denoises the 8x8x8 latents of a
# trained autoencoder (tools/train_vae.py, Stable Diffusion's layout): the UNet lays the scene out on an 8x8
# grid with cross-attention at 8x8 and 4x4, where every cell is one convolution from the border and so knows
# where it is.
ARCHS = {
    "v1": {"text_width": 32, "text_layers": 2, "text_ffn": 37, "text_heads": 4, "latents": "fold"},
    "v2": {"text_width": 64, "text_layers": 4, "text_ffn": 256, "text_heads": 4, "latents": "fold"},
    "v3": {"text_width": 64, "text_layers": 4, "text_ffn": 256, "text_heads": 4, "latents": "vae"},
}
VAE_CHECKPOINT = TOOLS / "checkpoints" / "scenes-vae.pt"


def build_text_encoder(arch: str):
    if arch == "v1":
        return io.build_text_encoder()
    from transformers import CLIPTextConfig, CLIPTextModel

    a = ARCHS[arch]
    config = CLIPTextConfig(
        vocab_size=io.VOCAB_SIZE, hidden_size=a["text_width"], intermediate_size=a["text_ffn"],
        projection_dim=a["text_width"], num_hidden_layers=a["text_layers"], num_attention_heads=a["text_heads"],
        max_position_embeddings=io.MAX_LENGTH, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=io.BOS_ID, eos_token_id=io.EOS_ID, pad_token_id=io.EOS_ID, attn_implementation="eager")
    config.architectures = ["CLIPTextModel"]
    torch.manual_seed(SEED + 1)
    return CLIPTextModel(config).eval()


def build_unet(arch: str = "v1") -> UNet2DConditionModel:
    torch.manual_seed(SEED)
    if ARCHS[arch]["latents"] == "vae":
        shape = dict(sample_size=VaeLatents.hw, in_channels=VaeLatents.channels, out_channels=VaeLatents.channels,
                     block_out_channels=(56, 112), norm_num_groups=8,
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    else:
        shape = dict(sample_size=FoldLatents.hw, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                     block_out_channels=(48, 96), norm_num_groups=16,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    return UNet2DConditionModel(**shape, layers_per_block=1, cross_attention_dim=ARCHS[arch]["text_width"],
                                attention_head_dim=8)


def fold(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, 64, 64] in [-1, 1] -> latents [B, 48, 16, 16]."""
    return nn.functional.pixel_unshuffle((pixels - SHIFT) * SCALE, FOLD)


class Unfold(nn.Module):
    """The bundle's VAE decoder: latents [B, 48, h, w] -> pixels [B, 3, 4h, 4w] in [-1, 1] (nominally).

    diffusers-style pipelines call it with latents / scaling_factor + shift_factor; the config sets
    scaling_factor = SCALE and shift_factor = SHIFT, so it only has to rearrange."""

    def forward(self, latent_sample):
        b, c, h, w = latent_sample.shape
        x = latent_sample.reshape(b, 3, FOLD, FOLD, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, 3, h * FOLD, w * FOLD)


class FoldLatents:
    """v1/v2: pixel space folded 4x4 into 48 channels; the bundle's decoder only rearranges."""

    channels, hw = LATENT_CHANNELS, SIZE // FOLD

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return fold(pixels)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return Unfold()(latents / SCALE) + SHIFT

    def decoder_module(self) -> nn.Module:
        return Unfold()

    def decoder_config(self) -> dict:
        return {
            "_class_name": "SpaceToDepthDecoder",
            "_note": "pixel space folded 4x4 into 48 channels; decoder = depth-to-space (tools/train_diffusion.py)",
            "block_out_channels": [LATENT_CHANNELS] * 3,  # length 3: 2 ** (3 - 1) = 4x upsampling
            "latent_channels": LATENT_CHANNELS,
            "in_channels": 3,
            "out_channels": 3,
            "sample_size": SIZE,
            "scaling_factor": SCALE,
            "shift_factor": SHIFT,
        }


class VaeLatents:
    """v3: the 8x8x8 latents of tools/train_vae.py's autoencoder, (z - shift) * scale as in SD3's VAE config."""

    channels, hw = 8, SIZE // 8

    def __init__(self, path: Path = VAE_CHECKPOINT):
        import train_vae

        state = torch.load(path, weights_only=False)
        self.vae = train_vae.build_vae()
        self.vae.load_state_dict(state["ema"])
        self.vae.eval().requires_grad_(False)
        self.shift, self.scale = state["shift_factor"], state["scaling_factor"]

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return (self.vae.encode(pixels).latent_dist.mean - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scale + self.shift).sample

    def decoder_module(self) -> nn.Module:
        return VaeDecoder(self.vae)

    def decoder_config(self) -> dict:
        config = {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}
        config.update({"_class_name": "AutoencoderKL", "scaling_factor": self.scale, "shift_factor": self.shift})
        return config


class VaeDecoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample).sample


def latents_for(arch: str):
    return VaeLatents() if ARCHS[arch]["latents"] == "vae" else FoldLatents()


def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(SD_BETAS["beta_start"] ** 0.5, SD_BETAS["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


class Tokens:
    def __init__(self):
        self.tok = io.load_tokenizer(TOKENIZER_DIR)
        self.cache: dict[str, list[int]] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = []
        for t in texts:
            if t not in self.cache:
                self.cache[t] = io.tokenize(self.tok, t)
            out.append(self.cache[t])
        return torch.tensor(out, dtype=torch.int64)


def loss_weight(alpha_bar: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-example weight on the squared v error.

    "min-snr5" is diffusers' min-SNR-5 for v-prediction, min(SNR, 5) / (SNR + 1): it is about 0.005 at
    t = 999 and below 0.06 for t > 750, so the high-noise steps that decide where objects go (the first of a
    4-step sampler is t = 999) barely train; steps 0-13975 of the first run used it and placed the two
    objects of a relation caption at random. "v-min5" keeps weight 1 there (the plain v loss, an x0 error
    weighted SNR + 1) and clips the low-noise end the same way, min(SNR + 1, 5) / (SNR + 1)."""
    snr = alpha_bar / (1 - alpha_bar)
    five = torch.tensor(5.0)
    if weighting == "min-snr5":
        return torch.minimum(snr, five) / (snr + 1)
    if weighting == "v-min5":
        return torch.minimum(snr + 1, five) / (snr + 1)
    raise ValueError(f"unknown --weighting {weighting!r} (min-snr5 or v-min5)")


def batch_at(step: int, batch: int) -> tuple[torch.Tensor, list[str]]:
    pics, texts = [], []
    for i in range(batch):
        img, text = scenes.training_example(step * batch + i, seed=SEED)
        pics.append(img)
        texts.append(text)
    x = torch.from_numpy(np.stack(pics)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, texts


def load_models(run: Path, ema: bool = True):
    state = torch.load(run / "ckpt.pt", weights_only=False)
    arch = state.get("arch", "v1")
    unet, te = build_unet(arch), build_text_encoder(arch)
    unet.load_state_dict(state["ema_unet" if ema else "unet"])
    te.load_state_dict(state["ema_te" if ema else "te"])
    return unet.eval(), te.eval(), latents_for(arch), state


def train(args) -> None:
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    unet, te = build_unet(args.arch), build_text_encoder(args.arch)
    latents = latents_for(args.arch)
    te.train()
    unet.train()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    ckpt = run / "ckpt.pt"
    if ckpt.is_file():
        arch = torch.load(ckpt, weights_only=False).get("arch", "v1")
        if arch != args.arch:
            raise SystemExit(f"{ckpt} is arch {arch}, not --arch {args.arch}")
    else:
        if args.init_unet:
            warm_start(unet, ema_unet, Path(args.init_unet), "ema_unet")
        if args.init_te:
            warm_start(te, ema_te, Path(args.init_te), "ema_te")
    # a slim checkpoint (see `slim`) has no optimizer state: the optimizer restarts from its defaults
    step, wall = training.resume(ckpt, {"unet": unet, "te": te, "ema_unet": ema_unet, "ema_te": ema_te,
                                        "opt": opt}, optional=("opt",))
    print(f"weighting {args.weighting}", flush=True)
    tokens = Tokens()
    empty = tokens([""])[0]
    ac = alphas_cumprod()
    progress = training.Progress(run, wall, args.save_seconds)
    ema_pairs = list(zip(list(ema_unet.parameters()) + list(ema_te.parameters()), params))
    while step < args.steps:
        g = torch.Generator().manual_seed(SEED * 1_000_003 + step)
        pixels, texts = batch_at(step, args.batch)
        ids = tokens(texts)
        drop = torch.rand(args.batch, generator=g) < 0.1
        ids[drop] = empty
        x0 = latents.encode(pixels)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        a = ac[t].reshape(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v
        weight = loss_weight(a, args.weighting)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 200)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            cond = te(input_ids=ids).last_hidden_state
            pred = unet(xt, t, encoder_hidden_states=cond, return_dict=False)[0]
        loss = (weight * (pred.float() - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        training.ema_update(ema_pairs, training.warmup_decay(step))
        step += 1
        progress.report(step, f"loss {loss.item():.4f}")
        progress.checkpoint(ckpt, step, args.steps, lambda: {
            "unet": unet.state_dict(), "te": te.state_dict(), "ema_unet": ema_unet.state_dict(),
            "ema_te": ema_te.state_dict(), "opt": opt.state_dict(), "arch": args.arch})
        if step % args.sample_every == 0:
            grid = sample((ema_unet, ema_te, latents), tokens, SAMPLE_CAPTIONS, steps=4, guidance=3.0, seed=0)
            save_grid(grid, run / f"samples_{step:06d}.png")


def warm_start(model, ema_model, path: Path, key: str) -> None:
    """A model's weights from another run's checkpoint (its EMA, `key`), except those whose shape differs
    (the cross-attention key/value projections when the text width changed): those keep their init."""
    source = torch.load(path, weights_only=False)[key]
    own = model.state_dict()
    kept = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(kept, strict=False)
    ema_model.load_state_dict(kept, strict=False)
    print(f"{key} from {path}: {len(kept)} of {len(own)} tensors, the rest fresh", flush=True)


# ---------------------------------------------------------------------------
# Sampling (diffusers' Euler scheduler, as the bundle's scheduler_config.json describes it)


def scheduler_config() -> dict:
    return dict(SD_BETAS, prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=1,
                interpolation_type="linear", use_karras_sigmas=False)


SAMPLERS = {
    "euler": lambda: EulerDiscreteScheduler(**scheduler_config()),
    "dpm++2m": lambda: DPMSolverMultistepScheduler(
        **{k: v for k, v in scheduler_config().items() if k != "interpolation_type"},
        algorithm_type="dpmsolver++", solver_order=2),
}


@torch.no_grad()
def sample(models, tokens, texts: list[str], steps: int, guidance: float, seed: int,
           sampler: str = "euler") -> np.ndarray:
    """Pictures [N, 64, 64, 3] uint8, one per caption; caption i uses seed + i (as a batch-1 request would).
    models: (unet, text encoder, latents); sampler: "euler" (the bundle's) or "dpm++2m"."""
    unet, te, latents = models
    sched = SAMPLERS[sampler]()
    cond = te(input_ids=tokens(texts)).last_hidden_state
    uncond = te(input_ids=tokens([""])).last_hidden_state.expand_as(cond)
    lat = torch.cat([torch.randn(1, latents.channels, latents.hw, latents.hw,
                                 generator=torch.Generator("cpu").manual_seed(seed + i)) for i in range(len(texts))])
    sched.set_timesteps(steps)
    lat = lat * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.scale_model_input(torch.cat([lat, lat]), t)
        out = unet(x, t, encoder_hidden_states=torch.cat([uncond, cond]), return_dict=False)[0]
        u, c = out.chunk(2)
        lat = sched.step(u + guidance * (c - u), t, lat).prev_sample
    pixels = latents.decode(lat)
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def save_grid(pics: np.ndarray, path: Path, cols: int = 8) -> None:
    from PIL import Image

    n = len(pics)
    rows = (n + cols - 1) // cols
    canvas = np.full((rows * SIZE, cols * SIZE, 3), 255, dtype=np.uint8)
    for i, p in enumerate(pics):
        canvas[(i // cols) * SIZE:(i // cols + 1) * SIZE, (i % cols) * SIZE:(i % cols + 1) * SIZE] = p
    Image.fromarray(canvas).save(path)


# ---------------------------------------------------------------------------
# Evaluation with the scene checker


def evaluate(args) -> None:
    torch.set_num_threads(args.threads)
    *models, state = load_models(Path(args.run))
    tokens = Tokens()
    score(lambda texts, steps, seed: sample(models, tokens, texts, steps, args.guidance, seed, args.sampler),
          Path(args.run), state["step"], args)


def score(sampler, run: Path, step: int, args) -> dict:
    """The checker over the 240 held-out prompts and 240 training-distribution captions at each of
    args.step_counts; sampler(texts, steps, seed) -> uint8 pictures. Writes <run>/eval_<step>.json and the
    4-step held-out grid. With args.validation, 480 other training-distribution captions and seeds instead,
    for choosing a checkpoint or a setting without looking at the held-out prompts."""
    import check_scenes

    sets = evaluation_sets(args.validation)
    scheduler = getattr(args, "sampler", None)
    suffix = "" if scheduler in (None, "euler") else f"_{scheduler}"
    suffix += "" if args.guidance == 3.0 else f"_g{args.guidance:g}"
    suffix += "_validation" if "validation" in sets else ""
    results = {"step": step, "guidance": args.guidance, "sampler": scheduler}
    for steps in [int(s) for s in args.step_counts.split(",")]:
        for name, (texts, seed) in sets.items():
            pics = np.concatenate([sampler(texts[i:i + 16], steps, seed + i) for i in range(0, len(texts), 16)])
            rows = [check_scenes.check(p, t) for p, t in zip(pics, texts)]
            results[f"{name}_steps{steps}"] = summarise(rows, texts)
            if steps == 4 and name == "heldout":
                save_grid(pics[:32], run / f"eval_grid_{step:06d}{suffix}.png")
            print(name, steps, json.dumps(results[f"{name}_steps{steps}"]), flush=True)
    (run / f"eval_{step:06d}{suffix}.json").write_text(json.dumps(results, indent=1))
    return results


def add_validation_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--validation", action="store_true",
                   help="eval: 480 other training-distribution captions instead of the held-out set")


def evaluation_sets(validation: bool) -> dict[str, tuple[list[str], int]]:
    """name -> (captions, seed of the first)."""
    if validation:
        rng = random.Random(7)
        return {"validation": ([scenes.caption(scenes.sample_scene(rng, "train")) for _ in range(480)], 50_000)}
    prompts = scenes.load_heldout()["eval_prompts"]
    rng = random.Random(99)
    train_prompts = [scenes.caption(scenes.sample_scene(rng, "train")) for _ in range(len(prompts))]
    return {"heldout": (prompts, 1000), "train_distribution": (train_prompts, 1000)}


def probe(args) -> None:
    """Does the model read the relation word? One row per seed: "a red ball REL a blue car" for the six
    relations, then "a red ball" and "a blue car" alone, 4 steps. A model that ignores relations draws the
    six alike."""
    torch.set_num_threads(args.threads)
    *models, state = load_models(Path(args.run))
    tokens = Tokens()
    texts = [f"a red ball {r} a blue car" for r in scenes.RELATIONS] + ["a red ball", "a blue car"]
    pics = [sample(models, tokens, [t], 4, args.guidance, seed)[0] for seed in (7, 8, 9, 10) for t in texts]
    out = Path(args.out)
    save_grid(np.stack(pics), out)
    print(f"step {state['step']}: {out}")


def summarise(rows: list[dict], texts: list[str]) -> dict:
    out = {"n": len(rows)}
    for k in ("full", "objects", "colours", "counts", "relation"):
        vals = [r[k] for r in rows if r[k] is not None]
        out[k] = round(float(np.mean(vals)), 4) if vals else None
    rel = [r["full"] for r, t in zip(rows, texts) if scenes.parse_caption(t).relation]
    cnt = [r["full"] for r, t in zip(rows, texts) if not scenes.parse_caption(t).relation]
    out["full_relation_prompts"] = round(float(np.mean(rel)), 4) if rel else None
    out["full_count_prompts"] = round(float(np.mean(cnt)), 4) if cnt else None
    return out


# ---------------------------------------------------------------------------
# Export


class UNetExport(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond,
                         return_dict=False)[0]


def manifest(trained_by: str, scheduler: str, guidance: float, steps: int) -> str:
    return f"""# edgegen bundle manifest
name = "Scenes SD (64x64)"
kind = "diffusion"
description = \"\"\"A small Stable-Diffusion-shaped model (CLIP text encoder, UNet with cross-attention, VAE decoder) trained from scratch on CPU ({trained_by}) on the procedural clip-art world of tools/scenes.py: colours red, green, blue, yellow, orange, purple; objects apple, tree, sun, house, car, ball, cloud, flower; counts one to three; relations on, above, below, left of, right of, next to. See docs/quality.md for what it gets right.\"\"\"
license = "Apache-2.0"

[defaults]
steps = {steps}
guidance = {guidance}
width = 64
height = 64
scheduler = "{scheduler}"
"""


def export(args) -> None:
    io.setup_torch()
    unet, te, latents, state = load_models(Path(args.run))
    write_bundle(Path(args.out), (unet, te, latents), scheduler=EulerDiscreteScheduler(**scheduler_config()),
                 manifest_text=manifest(f"tools/train_diffusion.py, {state['step']} steps", "euler", 3.0,
                                        args.default_steps))
    print(f"exported step {state['step']} to {args.out}")


def write_bundle(out: Path, models, scheduler, manifest_text: str) -> None:
    """The diffusers/optimum ONNX layout the pipeline loads. A UNet with time_cond_proj_dim (an LCM student)
    gets the timestep_cond input."""
    unet, te, latents = models
    unet.set_attn_processor(AttnProcessor())
    io.clean_dir(out)
    io.copy_tokenizer(TOKENIZER_DIR, out / "tokenizer")
    io.export_text_encoder(te, out / "text_encoder" / "model.onnx", torch.int32)
    io.write_text_encoder_config(te, out / "text_encoder")
    hw, channels = latents.hw, latents.channels
    g = torch.Generator().manual_seed(0)
    cond_dim = unet.config.time_cond_proj_dim
    names = ["sample", "timestep", "encoder_hidden_states"] + (["timestep_cond"] if cond_dim else [])
    example = [torch.randn(2, channels, hw, hw, generator=g), torch.tensor(999.0),
               torch.randn(2, io.MAX_LENGTH, te.config.hidden_size, generator=g)]
    example += [torch.randn(2, cond_dim, generator=g)] if cond_dim else []
    axes = {"sample": {0: "batch_size", 2: "height", 3: "width"},
            "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
            "out_sample": {0: "batch_size", 2: "height", 3: "width"}}
    axes.update({"timestep_cond": {0: "batch_size"}} if cond_dim else {})
    io.export_onnx(UNetExport(unet), tuple(example), out / "unet" / "model.onnx", names, ["out_sample"], axes)
    unet.save_config(str(out / "unet"))
    io.export_onnx(latents.decoder_module(), (torch.randn(1, channels, hw, hw, generator=g),),
                   out / "vae_decoder" / "model.onnx",
                   ["latent_sample"], ["sample"],
                   {"latent_sample": {0: "batch_size", 2: "height", 3: "width"},
                    "sample": {0: "batch_size", 2: "height", 3: "width"}})
    io.write_plain_json(out / "vae_decoder" / "config.json", latents.decoder_config())
    scheduler.save_config(str(out / "scheduler"))
    io.write_plain_json(out / "model_index.json", {
        "_class_name": "LatentConsistencyModelPipeline" if cond_dim else "StableDiffusionPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": [None, None],
    })
    (out / "edgegen.toml").write_text(manifest_text, encoding="utf-8")
    # onnxruntime vs torch on one denoising call
    sess = io.ort_session(out / "unet" / "model.onnx")
    x = torch.randn(1, channels, hw, hw, generator=g)
    e = torch.randn(1, io.MAX_LENGTH, te.config.hidden_size, generator=g)
    feed = {"sample": x.numpy(), "timestep": np.array(500.0, dtype=np.float32), "encoder_hidden_states": e.numpy()}
    w = torch.randn(1, cond_dim, generator=g) if cond_dim else None
    if cond_dim:
        feed["timestep_cond"] = w.numpy()
    with torch.no_grad():
        want = unet(x, torch.tensor(500.0), encoder_hidden_states=e, timestep_cond=w, return_dict=False)[0]
    got = sess.run(["out_sample"], feed)[0]
    print(f"{out}: {io.dir_size(out)} bytes; unet onnx vs torch {io.max_abs_diff(got, want):.2e}")


REFERENCE_CASES = [
    ("a red apple on a green tree", 1), ("a blue car left of an orange house", 2), ("two yellow suns", 3),
    ("a purple ball", 4), ("a green cloud above a red flower", 5),
]


def references(args) -> None:
    """tests/fixtures/bundled/<model>/: the pictures onnxruntime makes from the exported bundle for fixed
    prompts and seeds at the manifest's defaults (tools/quantize.py's OrtBundle: latents drawn as edgegen
    draws them, the bundle's own scheduler, Euler or LCM)."""
    from PIL import Image

    from quantize import OrtBundle

    bundle = Path(args.out)
    dest = ROOT / "tests" / "fixtures" / "bundled" / bundle.name
    io.clean_dir(dest)
    runner = OrtBundle(bundle)
    cases = []
    for prompt, seed in REFERENCE_CASES:
        rgb = (runner.generate(prompt, seed) * 255).round().astype(np.uint8)
        png = f"seed{seed}-{'-'.join(prompt.split()[1:3])}.png"
        Image.fromarray(rgb).save(dest / png)
        cases.append({"prompt": prompt, "seed": seed, "png": png})
    io.write_plain_json(dest / "cases.json", {
        "model": bundle.name,
        "reference": "onnxruntime on the bundle's ONNX files, tools/train_diffusion.py references",
        "cases": cases,
    })
    print(f"{len(cases)} reference pictures in {dest}")


def slim(args) -> None:
    """A small resumable checkpoint (the EMA weights as both the weights and their average, no optimizer
    state): copy it to <run>/ckpt.pt and `train` continues from it."""
    state = torch.load(Path(args.run) / "ckpt.pt", weights_only=False)
    ema_unet, ema_te = state["ema_unet"], state["ema_te"]
    # the same tensors under two keys are stored once
    torch.save({"unet": ema_unet, "te": ema_te, "ema_unet": ema_unet, "ema_te": ema_te, "step": state["step"],
                "wall_seconds": state["wall_seconds"], "arch": state.get("arch", "v1")}, args.out)
    print(f"step {state['step']} -> {args.out} ({Path(args.out).stat().st_size} bytes)")


def bench(args) -> None:
    """Seconds per training step (fp32 and bf16 autocast) at the given batch, one thread."""
    torch.set_num_threads(1)
    unet, te, latents = build_unet(args.arch), build_text_encoder(args.arch), latents_for(args.arch)
    print(f"unet parameters {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M")
    opt = torch.optim.AdamW(list(unet.parameters()) + list(te.parameters()), 1e-4)
    tokens = Tokens()
    for bf16 in (False, True):
        times = []
        for step in range(4):
            t0 = time.monotonic()
            pixels, texts = batch_at(step, args.batch)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                cond = te(input_ids=tokens(texts)).last_hidden_state
                pred = unet(latents.encode(pixels), torch.randint(0, 1000, (args.batch,)), encoder_hidden_states=cond,
                            return_dict=False)[0]
            loss = pred.float().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.monotonic() - t0)
        print(f"bf16={bf16}: {np.median(times[1:]):.2f} s/step at batch {args.batch}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["train", "export", "eval", "bench", "slim", "probe", "references"])
    p.add_argument("--run", default="/work/train/diffusion")
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (AMX CPUs: faster)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads for train, eval and probe (2 when nothing else runs on a 2-core machine)")
    p.add_argument("--weighting", default="v-min5", choices=["v-min5", "min-snr5"])
    p.add_argument("--arch", default="v3", choices=list(ARCHS), help="model shape of a new run (see ARCHS)")
    p.add_argument("--init-unet", help="a new run's UNet starts from this checkpoint's (matching shapes only)")
    p.add_argument("--init-te", help="a new run's text encoder starts from this checkpoint's (matching shapes only)")
    p.add_argument("--save-seconds", type=float, default=180.0)
    p.add_argument("--sample-every", type=int, default=250)
    p.add_argument("--out", default="models/scenes-sd")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--step-counts", default="1,2,4,8")
    p.add_argument("--sampler", default="euler", choices=list(SAMPLERS), help="eval: the scheduler")
    add_validation_argument(p)
    p.add_argument("--default-steps", type=int, default=8,
                   help="export: the manifest's steps (Euler, undistilled: 8 is clearly better than 4)")
    args = p.parse_args()
    {"train": train, "export": export, "eval": evaluate, "bench": bench, "slim": slim,
     "probe": probe, "references": references}[args.command](args)


if __name__ == "__main__":
    main()
