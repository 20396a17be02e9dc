"""The pre-training loop shared by DINO and MAE: schedules, checkpoints every epoch (and every 10 minutes),
exact resume, time budget, progress output."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .card import write_outputs
from .common import (
    Objective,
    PretrainConfig,
    cosine,
    load_checkpoint,
    load_train_images,
    make_batch,
    save_checkpoint,
    validate,
)

SYNC_EVERY = 20  # steps between reading losses back from an accelerator


def train(
    cfg: PretrainConfig,
    out: Path,
    make_objective: Callable[[PretrainConfig], Objective],
    *,
    resume: bool = False,
    command: str = "",
    base_lr: float = 5e-4,
    wd: tuple[float, float] = (0.04, 0.4),
    betas: tuple[float, float] = (0.9, 0.999),
    clip: float | None = 3.0,
) -> dict[str, Any]:
    """Run (or resume) a pre-training; write checkpoint.pt each epoch, then model.safetensors + card files.

    Returns the card (dict). Training stops early (with a checkpoint, still exporting the model) when
    ``time_budget_min`` or ``stop_after_steps`` is reached; the card says so.
    """
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    images = load_train_images(cfg.data_root, cfg.limit)
    steps_per_epoch = len(images) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} exceeds the {len(images)} images; lower --batch-size")
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_frac * total)
    lr = cfg.lr if cfg.lr is not None else base_lr * cfg.batch_size / 256
    wd_start, wd_end = (cfg.weight_decay, cfg.weight_decay) if cfg.weight_decay is not None else wd

    torch.manual_seed(cfg.seed)
    obj = make_objective(cfg)
    device = torch.device(cfg.device)
    obj.modules.to(device)
    params = obj.parameters()
    # No weight decay on biases, norms, tokens and position embeddings (the DINO/MAE convention).
    decay = [p for p in params if p.ndim > 1 and p.shape[0] != 1]
    no_decay = [p for p in params if not (p.ndim > 1 and p.shape[0] != 1)]
    opt = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=betas,
        fused=device.type == "cuda",  # one kernel for the whole update instead of one per tensor group
    )
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    step, losses, wall = 0, [], 0.0

    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        if state["config"] != cfg.identity():
            diff = sorted(k for k in cfg.identity() if state["config"].get(k) != cfg.identity()[k])
            raise ConfigError(
                f"--resume: checkpoint {ckpt_path} was made with other settings ({', '.join(diff)}); "
                "use the same options or another --out"
            )
        obj.modules.load_state_dict(state["modules"])
        opt.load_state_dict(state["optimizer"])
        obj.load_extra_state(state["extra"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        step, losses, wall = state["step"], list(state["losses"]), float(state["wall_time_s"])

    # Losses stay on the device and are read back every SYNC_EVERY steps: reading each step's loss (and
    # testing it for NaN) makes the CPU wait for the GPU every step, so it can never queue the next step.
    pending: list[torch.Tensor] = []

    def flush() -> None:
        if not pending:
            return
        values = torch.stack(pending).tolist()
        first = step - len(values)
        pending.clear()
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise ConfigError(f"loss became {v} at step {first + i}; lower --lr (now {lr:g})")
        losses.extend(values)

    def checkpoint() -> None:
        flush()
        save_checkpoint(
            ckpt_path,
            {
                "config": cfg.identity(),
                "modules": obj.modules.state_dict(),
                "optimizer": opt.state_dict(),
                "extra": obj.extra_state(),
                "gen": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "step": step,
                "losses": losses,
                "wall_time_s": wall,
            },
        )

    progress = _Progress(enabled=cfg.progress, total=total, start=step)
    t0 = time.perf_counter()
    wall0 = wall
    stopped = None
    last_ckpt = t0
    amp_ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.amp == "bf16" else None
    obj.modules.train()
    while step < total:
        epoch, pos = divmod(step, steps_per_epoch)
        # The order of an epoch depends on (seed, epoch) only, so a resumed run sees the same batches.
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        for pos_i in range(pos, steps_per_epoch):
            idx = order[pos_i * cfg.batch_size : (pos_i + 1) * cfg.batch_size]
            x = make_batch(images, idx, cfg, gen)
            # With a time budget the schedules run on whichever is further along, steps or wall-clock, so
            # a budget-limited run still completes its warm-up, cosine decay and momentum ramp (at the cost
            # of bit-reproducibility: the step count then depends on the machine's speed).
            t = float(step)
            if cfg.time_budget_min is not None:
                t = max(t, (wall0 + time.perf_counter() - t0) / (cfg.time_budget_min * 60) * total)
            for i, group in enumerate(opt.param_groups):
                group["lr"] = cosine(t, total, lr, 1e-6, warmup)
                if i == 0:
                    group["weight_decay"] = cosine(t, total, wd_start, wd_end)
            if amp_ctx is not None:
                with amp_ctx():
                    loss = obj.step(x, gen, t, total)
            else:
                loss = obj.step(x, gen, t, total)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            obj.after_step(t, total)
            step += 1
            pending.append(loss.detach().float())
            if len(pending) >= SYNC_EVERY or device.type == "cpu":
                flush()
                progress.update(step, losses[-1], cfg.batch_size, epoch)
            wall = wall0 + time.perf_counter() - t0
            if cfg.stop_after_steps is not None and step >= cfg.stop_after_steps and step < total:
                stopped = f"stopped after {step} of {total} steps (--stop-after-steps)"
            elif cfg.time_budget_min is not None and wall >= cfg.time_budget_min * 60 and step < total:
                stopped = (
                    f"stopped by the time budget ({cfg.time_budget_min:g} min) after {step} of {total} steps"
                )
            if stopped:
                break
            if time.perf_counter() - last_ckpt > 600:  # long CPU epochs: also checkpoint every 10 minutes
                checkpoint()
                last_ckpt = time.perf_counter()
        checkpoint()
        if stopped:
            break
    flush()
    progress.close()
    card = write_outputs(
        out, cfg, obj, losses, wall, step, total, steps_per_epoch, len(images), command, stopped
    )
    return card


class _Progress:
    """A rich progress bar (loss, images/s) on a terminal; plain log lines otherwise (background runs)."""

    def __init__(self, *, enabled: bool, total: int, start: int) -> None:
        self.enabled, self.total, self.t0, self.s0 = enabled, total, time.perf_counter(), start
        self.bar, self.printed = None, start
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("pretrain"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, loss: float, batch: int, epoch: int) -> None:
        if not self.enabled:
            return
        rate = (step - self.s0) * batch / max(1e-9, time.perf_counter() - self.t0)
        info = f"epoch {epoch} loss {loss:.4f} {rate:.0f} img/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif step - self.printed >= 20 or step == self.total:
            self.printed = step
            print(f"[{time.strftime('%H:%M:%S')}] step {step}/{self.total} {info}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
