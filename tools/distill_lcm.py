"""Latent consistency distillation of the scene diffusion model (tools/train_diffusion.py): a student UNet
that makes a picture in 1-4 LCM steps, with the guidance scale as an input (timestep_cond) instead of a
second, unconditional UNet pass.

Recipe (Luo et al. 2023, "Latent Consistency Models"; diffusers' train_lcm_distill_sd_wds.py):
- student: the teacher's UNet config plus time_cond_proj_dim = COND_DIM, the teacher's weights, the guidance
  projection zero-initialised (so step 0 predicts exactly what the teacher does);
- skipping-step DDIM solver on the 50-step grid LCMScheduler samples from (original_inference_steps = 50):
  from t_{n+k} the teacher, with classifier-free guidance w ~ U[W_MIN, W_MAX], takes one DDIM step to t_n;
- target: the EMA ("target") student's consistency function at t_n; loss: pseudo-Huber between that and
  the online student's at t_{n+k}; c_skip / c_out: LCM's boundary conditions with timestep_scaling 10;
- the text encoder and the autoencoder are the teacher's, frozen.

CPU, seeded, checkpoints to <run>/ckpt.pt and resumes:

    nohup /work/venv/bin/python tools/distill_lcm.py train --teacher /work/train/diffusion3 --run /work/train/lcm4 &
    # choose a snapshot (and a guidance scale) on the validation captions, then the full table for it
    /work/venv/bin/python tools/distill_lcm.py eval --run /work/train/lcm4 --snapshot 2000 --step-counts 4 --validation
    /work/venv/bin/python tools/distill_lcm.py eval --run /work/train/lcm4 --snapshot 2000   # 1/2/4/8 steps
    /work/venv/bin/python tools/distill_lcm.py export --run /work/train/lcm4 --snapshot 2000 --out models/scenes-sd

The shipped student: --lr 5e-5 (the defaults), snapshot 2 000, guidance 3 (docs/quality.md).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_diffusion as td  # noqa: E402
import training  # noqa: E402

from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel  # noqa: E402

COND_DIM = 64
SOLVER_STEPS = 50  # = LCMScheduler's original_inference_steps
W_MIN, W_MAX = 1.0, 5.0  # w = guidance scale - 1
TARGET_EMA = 0.95
AVERAGE_EMA = 0.999  # the weights evaluated and exported: the online student wanders at a useful lr
HUBER_C = 0.001
SEED = 31


def lcm_scheduler() -> LCMScheduler:
    config = {k: v for k, v in td.scheduler_config().items()
              if k not in ("interpolation_type", "use_karras_sigmas", "timestep_spacing")}
    return LCMScheduler(**config, original_inference_steps=SOLVER_STEPS, timestep_scaling=10.0,
                        set_alpha_to_one=True)


def build_student(teacher: UNet2DConditionModel) -> UNet2DConditionModel:
    # the constructor, not from_config: from_config resets the keys the teacher left at their defaults
    config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = COND_DIM
    student = UNet2DConditionModel(**config)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def guidance_embedding(w: torch.Tensor) -> torch.Tensor:
    return LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=COND_DIM)


def boundary(t: torch.Tensor, sigma_data: float = 0.5, scaling: float = 10.0) -> tuple[torch.Tensor, ...]:
    """LCM's c_skip, c_out at timestep t (as LCMScheduler computes them)."""
    scaled = t.float() * scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip.reshape(-1, 1, 1, 1), c_out.reshape(-1, 1, 1, 1)


def split_v(v: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v-prediction -> (x0, eps) at alpha_bar a."""
    return a.sqrt() * x - (1 - a).sqrt() * v, (1 - a).sqrt() * x + a.sqrt() * v


def consistency(unet, x, t, a, cond, w_emb) -> torch.Tensor:
    v = unet(x, t, encoder_hidden_states=cond, timestep_cond=w_emb, return_dict=False)[0]
    x0, _ = split_v(v, x, a)
    c_skip, c_out = boundary(t)
    return c_skip * x + c_out * x0


def load_teacher(path: Path):
    unet, te, latents, state = td.load_models(path)
    unet.requires_grad_(False)
    te.requires_grad_(False)
    return unet, te, latents, state


def train(args) -> None:
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    ckpt = run / "ckpt.pt"
    if not ckpt.is_file():
        snapshot_teacher(Path(args.teacher), run / "teacher")
    teacher, te, latents, tstate = load_teacher(run / "teacher")
    student = build_student(teacher).train()
    target = copy.deepcopy(student).eval().requires_grad_(False)
    average = copy.deepcopy(student).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    step, wall = training.resume(ckpt, {"student": student, "target": target, "average": average, "opt": opt})
    print(f"teacher at step {tstate['step']}", flush=True)
    tokens = td.Tokens()
    empty = te(input_ids=tokens([""])).last_hidden_state
    ac = td.alphas_cumprod()
    k = 1000 // SOLVER_STEPS
    grid = torch.arange(1, SOLVER_STEPS + 1) * k - 1  # 19, 39, ..., 999
    progress = training.Progress(run, wall, args.save_seconds)
    pairs = list(zip(target.parameters(), student.parameters()))
    average_pairs = list(zip(average.parameters(), student.parameters()))
    while step < args.steps:
        g = torch.Generator().manual_seed(SEED * 1_000_003 + step)
        pixels, texts = td.batch_at(10_000_000 + step, args.batch)
        with torch.no_grad():
            x0 = latents.encode(pixels)
            cond = te(input_ids=tokens(texts)).last_hidden_state
        b = x0.shape[0]
        index = torch.randint(0, SOLVER_STEPS, (b,), generator=g)
        t_start, t_prev = grid[index], (grid[index] - k).clamp(min=0)
        a_start, a_prev = ac[t_start].reshape(-1, 1, 1, 1), ac[t_prev].reshape(-1, 1, 1, 1)
        a_prev = torch.where((grid[index] - k).reshape(-1, 1, 1, 1) < 0, torch.ones_like(a_prev), a_prev)
        noise = torch.randn(x0.shape, generator=g)
        x_start = a_start.sqrt() * x0 + (1 - a_start).sqrt() * noise
        w = W_MIN + (W_MAX - W_MIN) * torch.rand(b, generator=g)
        w_emb = guidance_embedding(w)
        pred = consistency(student, x_start, t_start, a_start, cond, w_emb)
        with torch.no_grad():
            v = teacher(torch.cat([x_start, x_start]), torch.cat([t_start, t_start]),
                        encoder_hidden_states=torch.cat([cond, empty.expand_as(cond)]), return_dict=False)[0]
            x0_c, eps_c = split_v(v[:b], x_start, a_start)
            x0_u, eps_u = split_v(v[b:], x_start, a_start)
            wr = w.reshape(-1, 1, 1, 1)
            x0_g, eps_g = x0_c + wr * (x0_c - x0_u), eps_c + wr * (eps_c - eps_u)
            x_prev = a_prev.sqrt() * x0_g + (1 - a_prev).sqrt() * eps_g
            want = consistency(target, x_prev, t_prev, a_prev, cond, w_emb)
        loss = (((pred - want) ** 2 + HUBER_C**2).sqrt() - HUBER_C).mean()
        if args.cosine:
            for group in opt.param_groups:
                group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        training.ema_update(pairs, TARGET_EMA)
        training.ema_update(average_pairs, AVERAGE_EMA)
        step += 1
        progress.report(step, f"loss {loss.item():.5f}")
        if step % args.snapshot_every == 0:
            training.save_checkpoint(run / f"average_{step:06d}.pt", {"step": step, "average": average.state_dict()})
        progress.checkpoint(ckpt, step, args.steps, lambda: {
            "student": student.state_dict(), "target": target.state_dict(), "average": average.state_dict(),
            "opt": opt.state_dict()})


def snapshot_teacher(source: Path, dest: Path) -> None:
    """The teacher's EMA weights as they are now (its run may go on training): <run>/teacher/ckpt.pt."""
    state = torch.load(source / "ckpt.pt", weights_only=False)
    dest.mkdir(parents=True, exist_ok=True)
    keep = {k: state[k] for k in ("ema_unet", "ema_te", "step", "wall_seconds", "arch") if k in state}
    training.save_checkpoint(dest / "ckpt.pt", keep)
    print(f"teacher: {source} at step {state['step']}", flush=True)


def load_student(run: Path, snapshot: int | None = None):
    """The averaged student of <run>/ckpt.pt, or of the snapshot <run>/average_<step>.pt (runs from before the
    average existed: the target student)."""
    name = f"average_{snapshot:06d}.pt" if snapshot is not None else "ckpt.pt"
    state = torch.load(run / name, weights_only=False)
    teacher, te, latents, tstate = load_teacher(run / "teacher")
    state["teacher_step"] = tstate["step"]
    student = build_student(teacher)
    student.load_state_dict(state["average"] if "average" in state else state["target"])
    return student.eval(), te, latents, state


@torch.no_grad()
def sample(models, tokens, texts: list[str], steps: int, guidance: float, seed: int) -> np.ndarray:
    """As edgegen samples an LCM bundle: caption i draws its initial latents and the per-step noise from one
    generator seeded seed + i."""
    unet, te, latents = models
    out = []
    for i, text in enumerate(texts):
        sched = lcm_scheduler()
        sched.set_timesteps(steps)
        gen = torch.Generator("cpu").manual_seed(seed + i)
        lat = torch.randn(1, latents.channels, latents.hw, latents.hw, generator=gen) * sched.init_noise_sigma
        cond = te(input_ids=tokens([text])).last_hidden_state
        w_emb = guidance_embedding(torch.tensor([guidance - 1.0]))
        for t in sched.timesteps:
            v = unet(lat, t, encoder_hidden_states=cond, timestep_cond=w_emb, return_dict=False)[0]
            lat, denoised = sched.step(v, t, lat, generator=gen, return_dict=False)
        out.append(denoised)
    pixels = latents.decode(torch.cat(out))
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def evaluate(args) -> None:
    torch.set_num_threads(args.threads)
    *models, state = load_student(Path(args.run), args.snapshot)
    tokens = td.Tokens()
    td.score(lambda texts, steps, seed: sample(models, tokens, texts, steps, args.guidance, seed),
             Path(args.run), state["step"], args)


def export(args) -> None:
    td.io.setup_torch()
    student, te, latents, state = load_student(Path(args.run), args.snapshot)
    trained_by = (f"tools/train_diffusion.py, {state['teacher_step']} steps, then LCM-distilled by tools/distill_lcm.py, "
                  f"{state['step']} steps")
    td.write_bundle(Path(args.out), (student, te, latents), scheduler=lcm_scheduler(),
                    manifest_text=td.manifest(trained_by, "lcm", args.guidance, 4))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["train", "eval", "export"])
    p.add_argument("--teacher", default="/work/train/diffusion3", help="a train_diffusion.py run directory")
    p.add_argument("--run", default="/work/train/lcm4")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--cosine", action="store_true", help="train: the learning rate decays to 0 at --steps (cosine)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-seconds", type=float, default=180.0)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--step-counts", default="1,2,4,8")
    p.add_argument("--out", default="models/scenes-sd")
    p.add_argument("--snapshot-every", type=int, default=500, help="train: keep the averaged student every N steps")
    td.add_validation_argument(p)
    p.add_argument("--snapshot", type=int, help="eval/export: the averaged student kept at this step")
    args = p.parse_args()
    {"train": train, "eval": evaluate, "export": export}[args.command](args)


if __name__ == "__main__":
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    main()
