"""Train the small autoencoder (diffusers AutoencoderKL, Stable Diffusion's VAE scaled down) of the scene world.

64x64 RGB <-> 8x8x8 latents (8x downsampling, like SD's VAE). The diffusion model of
tools/train_diffusion.py (arch "v3") denoises these latents, so its UNet lays out a scene on an 8x8 grid
and the decoder draws the clip-art; the bundle's vae_decoder is this model's decoder.

Loss: L1 + L2 on pixels in [-1, 1] (object pixels weighted up with --object-weight), KL weight 1e-5 on
the posterior (keeps the latents smooth enough to denoise), Gaussian noise of std LATENT_NOISE on the
sampled latent (the decoder then tolerates the small errors a few-step sampler leaves). Data:
tools/scenes.py split "train" only, so held-out colour-object pairs are never drawn by the decoder in
training either.

CPU, seeded, checkpoints to <run>/ckpt.pt and resumes:

    nohup /work/venv/bin/python tools/train_vae.py train --run /work/train/vae --steps 3000 --threads 2 &
    # decoder only, from the shipped checkpoint: the encoder (and so the diffusion model's latents) stays as is
    nohup /work/venv/bin/python tools/train_vae.py train --run /work/train/vae-decoder --decoder-only \
        --init tools/checkpoints/scenes-vae.pt --object-weight 4 --lr 3e-4 --steps 20000 &
    /work/venv/bin/python tools/train_vae.py eval --run /work/train/vae    # checker on reconstructions
    /work/venv/bin/python tools/train_vae.py slim --run /work/train/vae    # -> tools/checkpoints/scenes-vae.pt
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np
import torch

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
import scenes  # noqa: E402
import training  # noqa: E402

from diffusers import AutoencoderKL  # noqa: E402

SIZE = 64
LATENT_CHANNELS = 8
SEED = 23
KL_WEIGHT = 1e-5
LATENT_NOISE = 0.05


def build_vae() -> AutoencoderKL:
    torch.manual_seed(SEED)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=SIZE,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8)


def batch(start: int, n: int, seed: int = SEED) -> torch.Tensor:
    pics = [scenes.training_example(start + i, seed=seed)[0] for i in range(n)]
    return torch.from_numpy(np.stack(pics)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def load(run: Path) -> tuple[AutoencoderKL, dict]:
    state = torch.load(run / "ckpt.pt", weights_only=False)
    vae = build_vae()
    vae.load_state_dict(state["ema"])
    return vae.eval(), state


def train(args) -> None:
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    vae = build_vae().train()
    ckpt = run / "ckpt.pt"
    if args.init and not ckpt.is_file():
        vae.load_state_dict(torch.load(args.init, weights_only=False)["ema"])
    ema = copy.deepcopy(vae).eval()
    params = trainable(vae, args.decoder_only)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    step, wall = training.resume(ckpt, {"vae": vae, "ema": ema, "opt": opt})
    print(f"parameters: encoder {(count(vae.encoder) + count(vae.quant_conv)) / 1e6:.2f} M, decoder "
          f"{(count(vae.decoder) + count(vae.post_quant_conv)) / 1e6:.2f} M", flush=True)
    progress = training.Progress(run, wall, args.save_seconds)
    # a frozen encoder is left out: averaging a tensor with itself only adds rounding drift
    pairs = [(avg, live) for avg, live in zip(ema.parameters(), vae.parameters()) if live.requires_grad]
    while step < args.steps:
        g = torch.Generator().manual_seed(SEED * 7919 + step)
        x = batch(step * args.batch, args.batch)
        with torch.set_grad_enabled(not args.decoder_only):
            post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        z = z + LATENT_NOISE * torch.randn(z.shape, generator=g)
        y = vae.decode(z).sample
        rec = reconstruction_loss(y, x, args.object_weight)
        kl = post.kl().mean() / (SIZE * SIZE * 3)
        loss = rec + KL_WEIGHT * kl
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        training.ema_update(pairs, training.warmup_decay(step))
        step += 1
        progress.report(step, f"rec {rec.item():.4f} kl {kl.item():.3f}")
        progress.checkpoint(ckpt, step, args.steps, lambda: {
            "vae": vae.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict()})


def reconstruction_loss(y: torch.Tensor, x: torch.Tensor, object_weight: float) -> torch.Tensor:
    """L1 + L2, with pixels off the plain background (its colour is the top-left pixel's) weighted
    1 + object_weight: objects cover about an eighth of a picture, yet their shapes are what the checker reads."""
    err = (y - x).abs()
    weight = 1.0 + object_weight * ((x - x[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.05).float()
    return ((err + err ** 2) * weight).mean() / weight.mean()


def trainable(vae: AutoencoderKL, decoder_only: bool) -> list[torch.nn.Parameter]:
    """With decoder_only the encoder is frozen, so latents a diffusion model was trained on stay valid."""
    if decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    return [p for p in vae.parameters() if p.requires_grad]


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def latent_stats(vae: AutoencoderKL, n: int = 512) -> tuple[float, float]:
    """shift_factor and scaling_factor: (latents - shift) * scale has mean 0 and std 1 over n pictures."""
    z = torch.cat([vae.encode(batch(10_000_000 + i, 64)).latent_dist.mean for i in range(0, n, 64)])
    return float(z.mean()), float(1.0 / z.std())


@torch.no_grad()
def evaluate(args) -> None:
    """Checker on reconstructions of held-out pictures: the ceiling the diffusion model can reach."""
    torch.set_num_threads(args.threads)
    import check_scenes

    vae, state = load(Path(args.run))
    prompts = scenes.load_heldout()["eval_prompts"]
    rows, psnr = [], []
    for i, text in enumerate(prompts):
        pic = scenes.render(text, seed=5000 + i)
        x = torch.from_numpy(pic.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        out = ((y[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        rows.append(check_scenes.check(out, text))
        mse = float(((out.astype(np.float64) - pic) ** 2).mean())
        psnr.append(10 * np.log10(255 ** 2 / max(mse, 1e-10)))
    shift, scale = latent_stats(vae)
    result = {"step": state["step"], "n": len(rows), "psnr_db": round(float(np.mean(psnr)), 2),
              "shift_factor": round(shift, 4), "scaling_factor": round(scale, 4)}
    for k in ("full", "objects", "colours", "counts", "relation"):
        vals = [r[k] for r in rows if r[k] is not None]
        result[k] = round(float(np.mean(vals)), 4)
    print(json.dumps(result), flush=True)
    (Path(args.run) / f"eval_{state['step']:06d}.json").write_text(json.dumps(result, indent=1))


def slim(args) -> None:
    """The EMA weights and the latents' shift and scale: what tools/train_diffusion.py (arch v3) and the
    bundle's vae_decoder need."""
    torch.set_num_threads(args.threads)
    vae, state = load(Path(args.run))
    shift, scale = latent_stats(vae)
    torch.save({"ema": vae.state_dict(), "step": state["step"], "wall_seconds": state["wall_seconds"],
                "shift_factor": shift, "scaling_factor": scale}, args.out)
    print(f"step {state['step']} -> {args.out} ({Path(args.out).stat().st_size} bytes), "
          f"shift {shift:.4f} scale {scale:.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["train", "eval", "slim"])
    p.add_argument("--run", default="/work/train/vae")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--init", help="start from this slim checkpoint's weights (a fresh run only)")
    p.add_argument("--decoder-only", action="store_true", help="train the decoder; the encoder stays frozen")
    p.add_argument("--object-weight", type=float, default=0.0, help="extra loss weight on object pixels")
    p.add_argument("--save-seconds", type=float, default=120.0)
    p.add_argument("--out", default=str(TOOLS / "checkpoints" / "scenes-vae.pt"))
    args = p.parse_args()
    {"train": train, "eval": evaluate, "slim": slim}[args.command](args)


if __name__ == "__main__":
    main()
