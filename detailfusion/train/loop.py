"""The one training loop every stage uses.

It reads as a story: build optimiser and schedule, resume if a checkpoint exists, then for each
step: micro-batches -> forward -> loss -> backward, clip, step, log, checkpoint. AMP (bf16 on
CUDA, fp32 on CPU), gradient accumulation, DDP under ``torchrun`` and resumable checkpoints
are handled here so the tasks stay about their losses.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from detailfusion.train.config import LoopConfig

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"


# --------------------------------------------------------------------------- environment


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda", _local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def distributed_info() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def autocast_for(device: torch.device, amp: str):
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext(), None
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return torch.autocast(device_type=device.type, dtype=dtype), scaler


def lr_lambda(cfg: LoopConfig) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` (or constant)."""

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: LoopConfig):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=max(1, cfg.max_steps),
            pct_start=min(0.5, max(cfg.warmup_steps / max(1, cfg.max_steps), 0.01)),
            anneal_strategy="cos",
            div_factor=10.0,
            final_div_factor=1.0 / max(cfg.min_lr_ratio, 1e-4) / 10.0,
            cycle_momentum=False,
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, task: nn.Module, optimizer, scheduler, step: int, extra: dict) -> None:
    """Atomic: written to a temp file and renamed, so a kill never leaves a torn checkpoint."""
    state = {
        "model": task.model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file must not crash silently
        raise RuntimeError(f"{path}: unreadable checkpoint ({exc}); delete it to restart the stage") from exc


# --------------------------------------------------------------------------- the loop


def run_training(
    task: nn.Module,
    cfg: LoopConfig,
    out_dir: Path,
    *,
    run_config: dict | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    resume: bool = True,
) -> dict:
    """Train ``task`` for ``cfg.max_steps`` optimiser steps; returns a summary dict."""
    out_dir = Path(out_dir)
    ckpt_path = out_dir / "checkpoints" / CHECKPOINT
    rank, world = distributed_info()
    device = resolve_device(cfg.device)
    if cfg.num_threads and device.type == "cpu":
        torch.set_num_threads(cfg.num_threads)
    task.to(device)

    groups = task.optimizer_groups(cfg.lr, cfg.lr_backbone, cfg.weight_decay)
    trainable = {id(p) for g in groups for p in g["params"]}
    for p in task.parameters():
        p.requires_grad_(id(p) in trainable)
    optimizer = torch.optim.AdamW(groups, betas=(cfg.beta1, cfg.beta2))
    scheduler = build_scheduler(optimizer, cfg)
    autocast, scaler = autocast_for(device, cfg.amp)

    # Dropout and other in-loop randomness start from the run seed (torch's own initial seed
    # differs per process); a resumed run restores the generator state of its checkpoint instead.
    torch.manual_seed(cfg.seed)
    start = 0
    state = load_checkpoint(ckpt_path) if resume else None
    if state is not None:
        task.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start = int(state["step"])
        if rank == 0:
            log.warning("resuming %s from %s at step %d/%d", task.name, ckpt_path, start, cfg.max_steps)

    engine: nn.Module = task
    if world > 1:
        engine = nn.parallel.DistributedDataParallel(
            task, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )

    extra = {"run_config": run_config or {}, "loop": asdict(cfg), "task": task.name}
    history: dict[str, list[float]] = {}
    samples = 0
    t0 = time.perf_counter()
    bar = tqdm(
        total=cfg.max_steps, initial=start, desc=task.name, disable=not progress or rank != 0, dynamic_ncols=True
    )
    task.train()
    step = start
    try:
        for step in range(start, cfg.max_steps):
            logs: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                batch = task.batch(step, micro, cfg.grad_accum, rank, world)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                sync = contextlib.nullcontext()
                if world > 1 and micro < cfg.grad_accum - 1:
                    sync = engine.no_sync()
                with sync:
                    with autocast:
                        out = engine(batch)
                    loss = out["loss"] / cfg.grad_accum
                    if scaler is not None:
                        scaler.scale(loss).backward()
                    else:
                        loss.backward()
                for k, v in out.items():
                    logs[k] = logs.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
                samples += next(iter(batch.values())).shape[0] * world
            if scaler is not None:
                scaler.unscale_(optimizer)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            for k, v in logs.items():
                history.setdefault(k, []).append(v)
            done = step + 1
            elapsed = time.perf_counter() - t0
            rate = samples / elapsed if elapsed > 0 else 0.0
            if rank == 0:
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.3f}", sps=f"{rate:.0f}")
                if on_log is not None and (done % cfg.log_every == 0 or done == cfg.max_steps):
                    on_log(done, {**logs, "lr": scheduler.get_last_lr()[0], "samples_per_s": rate})
                if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
                    save_checkpoint(ckpt_path, task, optimizer, scheduler, done, extra)
            step = done
    except KeyboardInterrupt:
        if rank == 0 and step > start:
            save_checkpoint(ckpt_path, task, optimizer, scheduler, step, extra)
            log.warning("interrupted: checkpoint saved at step %d (%s); rerun to resume", step, ckpt_path)
        raise
    finally:
        bar.close()

    elapsed = time.perf_counter() - t0
    tail = max(1, min(20, len(history.get("loss", [1]))))
    summary = {
        "steps": cfg.max_steps,
        "resumed_from": start,
        "seconds": round(elapsed, 2),
        "samples": samples,
        "samples_per_s": round(samples / elapsed, 2) if elapsed > 0 else 0.0,
        **{f"final_{k}": round(sum(v[-tail:]) / len(v[-tail:]), 5) for k, v in history.items() if v},
    }
    return summary
