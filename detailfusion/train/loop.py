"""The one training loop every stage uses.

It reads as a story (:func:`run_training`): put the task on its device, freeze what no optimiser
group trains, build optimiser and schedule, resume if a checkpoint exists, then for each step run
:func:`train_step` (micro-batches -> forward -> loss -> backward, clip, step), log, checkpoint.
AMP (bf16 on CUDA; fp32 on the CPU, with oneDNN's matrix products where they are faster),
gradient accumulation, DDP under ``torchrun`` and resumable
checkpoints are handled here so the tasks stay about their losses (``tasks.LoopTask`` says what
the loop needs from a task).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from detailfusion.errors import ConfigError
from detailfusion.fsutil import atomic_path
from detailfusion.pipeline import local_rank
from detailfusion.train.config import LoopConfig
from detailfusion.train.tasks import LoopTask

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"


# --------------------------------------------------------------------------- environment


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def distributed_info() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def cpu_prefers_onednn_fp32(cpuinfo: str | None = None) -> bool:
    """Whether ``loop.amp: auto`` picks ``matmul-bf16`` on this CPU: one with AVX512-BF16 and
    without AMX (Linux's ``/proc/cpuinfo`` flags, or those of the ``cpuinfo`` text given). There
    oneDNN, allowed bf16 math, keeps its fp32 kernels, which beat the BLAS's (measured on an AMD
    EPYC, Zen 5; README "Where the time goes"). With AMX it would compute in bf16, so auto keeps
    fp32 there; without AVX512-BF16 nothing was measured. False where the flags cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags and "amx_bf16" not in flags


def resolve_amp(device: torch.device, amp: str) -> str:
    """The number format ``loop.amp`` trains in on ``device``: ``bf16`` / ``fp16`` (autocast),
    ``matmul-bf16`` (fp32 tensors, oneDNN matrix products with bf16 math permitted; CPU only,
    :func:`matmul_precision`) or
    ``off`` (fp32). ``auto``: bf16 on CUDA, matmul-bf16 where :func:`cpu_prefers_onednn_fp32`,
    else fp32."""
    if amp == "auto":
        if device.type == "cuda":
            return "bf16"
        return "matmul-bf16" if device.type == "cpu" and cpu_prefers_onednn_fp32() else "off"
    if amp == "matmul-bf16" and device.type != "cpu":
        raise ConfigError(f"loop.amp: matmul-bf16 is a CPU format (oneDNN); on {device.type} use bf16 or auto")
    return amp


def autocast_for(device: torch.device, amp: str):
    """(autocast context, GradScaler or None): bf16 needs no scaler, fp16 does, fp32 and
    matmul-bf16 (no autocast: see :func:`matmul_precision`) neither."""
    amp = resolve_amp(device, amp)
    if amp in ("off", "matmul-bf16"):
        return contextlib.nullcontext(), None
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return torch.autocast(device_type=device.type, dtype=dtype), scaler


@contextlib.contextmanager
def matmul_precision(amp: str):
    """The process-wide precision of a training loop in the resolved format ``amp``.

    For ``matmul-bf16``: tensors, weights, gradients and optimiser state stay fp32, and matrix
    products and convolutions (forward and backward) go to oneDNN with bf16 math permitted (what
    PyTorch calls bf32). oneDNN computes them in bf16 where the CPU has AMX; on an AVX-512 CPU
    such as the AMD EPYC of the committed runs it keeps its fp32 kernels, which run there about
    twice as fast as the BLAS's and agree with them to fp32 rounding. Attention takes the math
    kernel (matrix products and a softmax), since the CPU flash-attention kernel becomes several
    times slower in this mode. Every other format leaves the settings as they are. The previous
    settings come back on exit, so evaluation after training runs as before.
    """
    if amp != "matmul-bf16":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mkldnn = torch.backends.mkldnn
    before = (mkldnn.matmul.fp32_precision, mkldnn.conv.fp32_precision)
    mkldnn.matmul.fp32_precision = "bf16"
    mkldnn.conv.fp32_precision = "bf16"
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        mkldnn.matmul.fp32_precision, mkldnn.conv.fp32_precision = before


# --------------------------------------------------------------------------- optimiser and schedule


def freeze_untrained(module: nn.Module, groups: list[dict]) -> list[str]:
    """Train exactly the parameters of ``groups``: ``requires_grad`` on for them, off for every
    other parameter of ``module`` (stage 3 freezes the branches this way). Returns the names of
    the frozen parameters."""
    trainable = {id(p) for g in groups for p in g["params"]}
    frozen = []
    for name, p in module.named_parameters():
        p.requires_grad_(id(p) in trainable)
        if id(p) not in trainable:
            frozen.append(name)
    return frozen


_FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def build_optimizer(groups: list[dict], cfg: LoopConfig) -> torch.optim.Optimizer:
    """AdamW over the task's parameter groups (each keeps its own ``lr``, ``weight_decay`` and
    ``name``); betas from ``cfg``. Unnamed groups are called ``group<i>``; names must be unique,
    they are the keys of the per-group learning rates in the logs.

    The fused update (one kernel over all of a device's tensors) where torch has one for every
    parameter's device (CPU and CUDA), else the multi-tensor (``foreach``) one. On the CPU (2
    threads) the fused step of the tiny default takes about 4 ms against 15 ms for ``foreach``
    (its token table, 6.3M of the 8.6M parameters, dominates): a stage-2 step 15% faster. It is
    the same algorithm but rounds differently in the last bits (``tests/test_loop.py``), so runs
    before and after it are different draws of one training."""
    named = [{**g, "name": g.get("name") or f"group{i}"} for i, g in enumerate(groups)]
    names = [g["name"] for g in named]
    if len(set(names)) != len(names):
        raise ValueError(f"optimizer groups: group names must be unique, got {names}")
    params = [p for g in named for p in g["params"]]
    fused = all(p.device.type in _FUSED_ADAMW_DEVICES and p.is_floating_point() for p in params)
    impl = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(named, betas=(cfg.beta1, cfg.beta2), **impl)


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
    """``cfg.schedule``: warm-up + cosine / constant (LambdaLR), or OneCycle from ``lr / 10``
    up to each group's ``lr`` and down to ``lr * min_lr_ratio``."""
    if cfg.schedule == "onecycle":
        total = max(1, cfg.max_steps)
        pct_start = min(0.5, max(cfg.warmup_steps / total, 0.01))
        if pct_start * total <= 1:  # a warm-up phase shorter than one step (torch divides by zero at 1)
            pct_start = min(0.99, 1.5 / total)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total,
            pct_start=pct_start,
            anneal_strategy="cos",
            div_factor=10.0,
            final_div_factor=1.0 / max(cfg.min_lr_ratio, 1e-4) / 10.0,
            cycle_momentum=False,
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def group_lrs(optimizer: torch.optim.Optimizer, scheduler) -> dict[str, float]:
    """The learning rate of each parameter group as ``lr/<group name>`` (MLflow-safe keys)."""
    return {f"lr/{g['name']}": lr for g, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True)}


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, task: nn.Module, optimizer, scheduler, step: int, extra: dict) -> None:
    """Atomic: written to a temp file and renamed, so a kill never leaves a torn checkpoint.

    A task with state of its own that the next steps read (stage 2's target bank) exposes it as
    ``loop_state()`` / ``load_loop_state(state)``; it is saved as ``task_state``."""
    state = {
        "model": task.model.state_dict(),
        **({"task_state": task.loop_state()} if hasattr(task, "loop_state") else {}),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file must not crash silently
        raise RuntimeError(f"{path}: unreadable checkpoint ({exc}); delete it to restart the stage") from exc


def restore_checkpoint(state: dict, task: LoopTask, optimizer, scheduler) -> int:
    """Model, optimiser, schedule and RNG state of a checkpoint; returns its step."""
    task.model.load_state_dict(state["model"])
    if hasattr(task, "load_loop_state"):
        if "task_state" not in state:
            raise RuntimeError(f"{task.name}: the checkpoint lacks the task's own state (written by other code); "
                               "delete it to restart the stage")
        task.load_loop_state(state["task_state"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])


# --------------------------------------------------------------------------- one step


def train_step(
    task: LoopTask,
    optimizer: torch.optim.Optimizer,
    scheduler,
    cfg: LoopConfig,
    step: int,
    *,
    device: torch.device,
    engine: nn.Module | None = None,
    autocast=None,
    scaler: torch.amp.GradScaler | None = None,
    rank: int = 0,
    world: int = 1,
) -> tuple[dict[str, float], int]:
    """One optimiser step: ``cfg.grad_accum`` micro-batches (forward under ``autocast``, loss
    divided by ``grad_accum``, backward; DDP syncs gradients on the last one only), then unscale
    (fp16), clip to ``cfg.grad_clip``, optimiser and scheduler step, zero the gradients.

    ``engine`` is what runs the forward (the task or its DDP wrapper; default the task). Returns
    the task's outputs averaged over the micro-batches (floats) and the number of samples seen
    by all ranks.
    """
    engine = task if engine is None else engine
    autocast = contextlib.nullcontext() if autocast is None else autocast
    logs: dict[str, float] = {}
    samples = 0
    for micro in range(cfg.grad_accum):
        batch = task.batch(step, micro, cfg.grad_accum, rank, world)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        sync = contextlib.nullcontext()
        if world > 1 and micro < cfg.grad_accum - 1:
            sync = engine.no_sync()
        with sync:
            with autocast:
                out = engine(batch)
            if "loss" not in out:
                raise KeyError(f"task {task.name}: forward returned {sorted(out)}, without the 'loss' to minimise")
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
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return logs, samples


# --------------------------------------------------------------------------- the loop


def run_training(
    task: LoopTask,
    cfg: LoopConfig,
    out_dir: Path,
    *,
    run_config: dict | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    resume: bool = True,
) -> dict:
    """Train ``task`` for ``cfg.max_steps`` optimiser steps; returns a summary dict.

    ``on_log(step, logs)`` gets, every ``cfg.log_every`` steps and at the end, the task's
    outputs (``loss``, ``loss_*``, ...), ``lr/<group name>`` for each optimiser group and
    ``samples_per_s``.
    """
    if not isinstance(task, LoopTask):
        raise TypeError(f"{type(task).__name__} is not a training task (see detailfusion.train.tasks.LoopTask)")
    out_dir = Path(out_dir)
    ckpt_path = out_dir / "checkpoints" / CHECKPOINT
    rank, world = distributed_info()
    device = resolve_device(cfg.device)
    if cfg.num_threads and device.type == "cpu":
        torch.set_num_threads(cfg.num_threads)
    task.to(device)

    groups = task.optimizer_groups(cfg.lr, cfg.lr_backbone, cfg.weight_decay)
    frozen = freeze_untrained(task, groups)
    if frozen and rank == 0:
        log.info("%s: %d parameter tensors in no optimiser group are frozen", task.name, len(frozen))
    optimizer = build_optimizer(groups, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    amp = resolve_amp(device, cfg.amp)
    autocast, scaler = autocast_for(device, amp)

    # Dropout and other in-loop randomness start from the run seed (torch's own initial seed
    # differs per process); a resumed run restores the generator state of its checkpoint instead.
    torch.manual_seed(cfg.seed)
    start = 0
    history: dict[str, deque[float]] = {}  # the last FINAL_TAIL values of each output
    samples = 0
    state = load_checkpoint(ckpt_path) if resume else None
    if state is not None:
        start = restore_checkpoint(state, task, optimizer, scheduler)
        # the summary's final_* means and sample count as if the run had never stopped
        history = {k: deque(v, maxlen=FINAL_TAIL) for k, v in state.get("history_tail", {}).items()}
        samples = int(state.get("samples", 0))
        if rank == 0:
            log.warning("resuming %s from %s at step %d/%d", task.name, ckpt_path, start, cfg.max_steps)

    engine: nn.Module = task
    if world > 1:
        engine = nn.parallel.DistributedDataParallel(
            task, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )

    extra = {"run_config": run_config or {}, "loop": asdict(cfg), "task": task.name}
    completed = start  # optimiser steps done, what an interrupted run's checkpoint records
    samples_before = samples
    t0 = time.perf_counter()
    bar = tqdm(
        total=cfg.max_steps, initial=start, desc=task.name, disable=not progress or rank != 0, dynamic_ncols=True
    )
    task.train()
    with matmul_precision(amp):  # bf16 matrix products on CPUs made for them (loop.amp)
        try:
            for step in range(start, cfg.max_steps):
                logs, n = train_step(task, optimizer, scheduler, cfg, step, device=device, engine=engine,
                                     autocast=autocast, scaler=scaler, rank=rank, world=world)  # fmt: skip
                completed = step + 1
                samples += n
                for k, v in logs.items():
                    history.setdefault(k, deque(maxlen=FINAL_TAIL)).append(v)
                elapsed = time.perf_counter() - t0
                rate = (samples - samples_before) / elapsed if elapsed > 0 else 0.0
                if rank == 0:
                    bar.update(1)
                    bar.set_postfix(loss=f"{logs['loss']:.3f}", sps=f"{rate:.0f}")
                    if on_log is not None and (completed % cfg.log_every == 0 or completed == cfg.max_steps):
                        on_log(completed, {**logs, **group_lrs(optimizer, scheduler), "samples_per_s": rate})
                    if completed % cfg.checkpoint_every == 0 or completed == cfg.max_steps:
                        save_checkpoint(ckpt_path, task, optimizer, scheduler, completed,
                                        _resume_extra(extra, history, samples))
        except KeyboardInterrupt:
            if rank == 0 and completed > start:
                save_checkpoint(ckpt_path, task, optimizer, scheduler, completed,
                                _resume_extra(extra, history, samples))
                log.warning("interrupted: checkpoint saved at step %d (%s); rerun to resume", completed, ckpt_path)
            raise
        finally:
            bar.close()

    elapsed = time.perf_counter() - t0
    summary = {
        "steps": cfg.max_steps,
        "amp": amp,  # the resolved number format (loop.amp auto depends on the device)
        "resumed_from": start,
        "seconds": round(elapsed, 2),
        "samples": samples,
        "samples_per_s": round((samples - samples_before) / elapsed, 2) if elapsed > 0 else 0.0,
        **{f"final_{k}": round(sum(v) / len(v), 5) for k, v in history.items() if v},
    }
    return summary


FINAL_TAIL = 20  # the summary's final_<output> is the mean of the last FINAL_TAIL steps


def _resume_extra(extra: dict, history: dict[str, deque[float]], samples: int) -> dict:
    """What a checkpoint carries besides the training state so that a resumed run's summary equals
    an uninterrupted one's: the last FINAL_TAIL values of each output and the samples so far."""
    return {**extra, "history_tail": {k: list(v) for k, v in history.items()}, "samples": samples}
