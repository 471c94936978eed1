"""Bookkeeping shared by the training scripts (train_diffusion, train_vae, train_gan, distill_lcm): averaged
weights, progress lines, checkpoints written atomically on a timer."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch


def warmup_decay(step: int, cap: float = 0.999) -> float:
    """EMA decay that starts near 0, so the average follows the first steps instead of the random init."""
    return min(cap, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(pairs, decay: float) -> None:
    """pairs: (averaged tensor, live tensor)."""
    for avg, live in pairs:
        avg.mul_(decay).add_(live, alpha=1 - decay)


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


class Progress:
    """Training wall time across resumes, a line every `every` steps on stdout and in <run>/log.txt, and a
    checkpoint every `save_seconds` and at the last step."""

    def __init__(self, run: Path, wall_seconds: float, save_seconds: float, every: int = 25):
        self.log = open(run / "log.txt", "a")
        self.started = time.monotonic() - wall_seconds
        self.last_save = time.monotonic()
        self.save_seconds = save_seconds
        self.every = every

    def wall(self) -> float:
        return time.monotonic() - self.started

    def report(self, step: int, text: str) -> None:
        if step % self.every:
            return
        line = f"step {step} {text} wall {self.wall() / 60:.1f} min"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def checkpoint(self, path: Path, step: int, last_step: int, state: Callable[[], dict]) -> None:
        """Writes state() plus step and wall_seconds to path when one is due."""
        if time.monotonic() - self.last_save <= self.save_seconds and step != last_step:
            return
        save_checkpoint(path, {**state(), "step": step, "wall_seconds": self.wall()})
        self.last_save = time.monotonic()


def resume(path: Path, parts: dict, optional: tuple[str, ...] = ()) -> tuple[int, float]:
    """Loads each of parts (checkpoint key -> module or optimizer) from the checkpoint at path, if there is
    one; keys in `optional` may be missing (a slim checkpoint has no optimizer state). Returns the step and
    the wall seconds trained so far (0, 0.0 for a fresh run)."""
    if not path.is_file():
        return 0, 0.0
    state = torch.load(path, weights_only=False)
    for key, part in parts.items():
        if key in state or key not in optional:
            part.load_state_dict(state[key])
    print(f"resumed at step {state['step']} ({state['wall_seconds'] / 60:.1f} min of training so far)", flush=True)
    return state["step"], state["wall_seconds"]
