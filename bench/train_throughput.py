"""Training throughput per stage: samples/s, peak memory and (on GPU) model FLOPs utilisation.

Runs the REAL training tasks (``detailfusion.train.tasks``) with the loop's own optimiser,
schedule and step (``detailfusion.train.loop``: build_optimizer, train_step) on random uint8
images and captions, so the numbers are those of the pipeline's inner loop without
data-set I/O. Each (config, stage) runs in its own subprocess so peak memory is per stage.

    python bench/train_throughput.py                       # tiny default + ViT-B-32 @ 224 on CPU
    python bench/train_throughput.py --configs tiny --steps 20
    python bench/train_throughput.py --device cuda --amp bf16 --configs vit-b-32 --batch 128
    python bench/train_throughput.py --configs tiny --stages stage2_branches --compile   # torch.compile'd forward

``--compile`` runs the task's forward (and so its backward) through ``torch.compile`` (inductor;
on the CPU it needs a C++ compiler); the warm-up steps then include the compilation, reported as
``warmup_s``, and the timed steps are the compiled ones.

Prints a markdown table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from detailfusion.pipeline import METHOD_STAGES

# Dense bf16 peak of the cards we may be lent (tensor cores, no sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _fake_triplets(n: int, n_images: int, seed: int):
    import numpy as np

    from detailfusion.train.data import Triplets

    rng = np.random.default_rng(seed)
    words = ["make", "the", "small", "red", "circle", "blue", "and", "move", "large", "square", "left"]
    texts = [" ".join(rng.choice(words, size=10)) for _ in range(n)]
    return Triplets(
        query_ids=[str(i) for i in range(n)],
        ref=rng.integers(0, n_images, n),
        target=rng.integers(0, n_images, n),
        captions=[[t] for t in texts],
        texts=texts,
        group=np.repeat(np.arange(n // 3 + 1), 3)[:n],
        negatives=rng.integers(0, n_images, (n, 4)),
        dataset="cirr",
    )


def run_stage(config: str, stage: str, batch: int, steps: int, warmup: int, device: str, amp: str,
              threads: int, compile_forward: bool = False) -> dict:
    from dataclasses import replace

    import numpy as np
    import torch

    from detailfusion.models import create_model
    from detailfusion.params import repo_section
    from detailfusion.train.config import LoopConfig
    from detailfusion.train.data import StepSampler
    from detailfusion.train.loop import (
        autocast_for,
        build_optimizer,
        build_scheduler,
        freeze_untrained,
        matmul_precision,
        resolve_amp,
        train_step,
    )
    from detailfusion.train.stages import cache_branch_outputs
    from detailfusion.train.tasks import BranchFinetuneTask, DetailPretrainTask, FusionTask

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    model = create_model(config, variant="full").to(dev)
    size = model.image_size
    n = batch * (steps + warmup)
    pixels = np.random.default_rng(0).integers(0, 256, (min(4 * n, 4096), size, size, 3), dtype=np.uint8)
    trip = _fake_triplets(n, len(pixels), 0)
    sampler = StepSampler(trip.group, batch, 0)
    if stage == "stage1_detail":
        task = DetailPretrainTask(model, trip, pixels, sampler, 0, mask_ratio=0.5)
    elif stage == "stage2_branches":
        task = BranchFinetuneTask(model, trip, pixels, sampler, 0, hard_negatives=2)
    else:
        gallery = repo_section(stage).negatives == "gallery"  # the stage's objective, as params.yaml sets it
        cache = cache_branch_outputs(model, trip, pixels, batch_size=batch, progress=False, gallery=gallery)
        task = FusionTask(model, cache, StepSampler(np.full(n, -1), batch, 0), 0)
    task.to(dev)
    # the pipeline's own optimiser, schedule and step (clip, AMP scaler) over every step run here
    # (optimiser settings from the stage's params.yaml loop; the backbone trains, lr_backbone = lr, in every
    # stage here so the figures measure the full backward pass, as they always have)
    loop = repo_section(stage).loop
    cfg: LoopConfig = replace(loop, max_steps=warmup + 1 + steps, batch_size=batch, warmup_steps=warmup, amp=amp,
                              device=device, lr_backbone=loop.lr)
    groups = task.optimizer_groups(cfg.lr, cfg.lr_backbone, cfg.weight_decay)
    freeze_untrained(task, groups)
    opt = build_optimizer(groups, cfg)
    scheduler = build_scheduler(opt, cfg)
    mode = resolve_amp(dev, amp)  # the format auto picks on this device
    autocast, scaler = autocast_for(dev, mode)
    task.train()
    engine = torch.compile(task) if compile_forward else None

    def one_step(step: int) -> None:
        train_step(task, opt, scheduler, cfg, step, device=dev, engine=engine, autocast=autocast, scaler=scaler)

    with matmul_precision(mode):  # matmul-bf16: matrix products by oneDNN (bf16 math permitted) for the steps timed
        t_warm = time.perf_counter()
        for s in range(warmup):
            one_step(s)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        warmup_s = time.perf_counter() - t_warm
        flops = None
        if dev.type == "cuda":
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                one_step(warmup)
            flops = counter.get_total_flops()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for s in range(warmup, warmup + steps):
            one_step(s)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    out = {
        "config": config, "stage": stage, "device": str(dev), "amp": mode, "compile": compile_forward,
        "batch": batch, "steps": steps, "threads": torch.get_num_threads(),
        "samples_per_s": round(batch * steps / dt, 2), "step_s": round(dt / steps, 4),
        "warmup_steps": warmup, "warmup_s": round(warmup_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        out["gpu"] = name
        out["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        out["flops_per_step"] = flops
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        if flops and peak:
            out["mfu"] = round(flops / (dt / steps) / peak, 4)
    return out


def is_tiny(config: str) -> bool:
    """A ``tiny*`` config, by name or as a path to its JSON file (``tiny``, ``tiny-p16``,
    ``bench/configs/tiny-p16.json``): small enough to time at full length on the CPU."""
    return Path(config).name.removesuffix(".json").startswith("tiny")


def run_size(config: str, device: str, batch: int, steps: int) -> tuple[int, int]:
    """(batch, timed steps) for one config: ``batch`` 0 means 64, or 8 for a large model on the
    CPU, which also times a third of ``steps`` (at least 2), since it is about 100x slower there."""
    small = is_tiny(config) or device != "cpu"
    return batch or (64 if small else 8), steps if small else max(2, steps // 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,vit-b-32")
    ap.add_argument("--stages", default=",".join(METHOD_STAGES))
    ap.add_argument("--batch", type=int, default=0, help="0 = 64 for tiny* configs, 8 for larger ones on the CPU")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="off", choices=["off", "bf16", "fp16", "matmul-bf16", "auto"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="torch.compile the task's forward (warm-up compiles)")
    ap.add_argument("--out", default="bench/results/train_throughput.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config:stage in this process
    args = ap.parse_args(argv)

    if args.one:
        config, stage = args.one.split(":")
        print(json.dumps(run_stage(config, stage, args.batch, args.steps, args.warmup, args.device, args.amp,
                                   args.threads, args.compile)))
        return 0

    rows = []
    for config in args.configs.split(","):
        batch, steps = run_size(config, args.device, args.batch, args.steps)
        if steps != args.steps:
            print(f"{config} on {args.device}: {steps} timed steps instead of {args.steps} (a large model on the CPU)",
                  file=sys.stderr)
        for stage in args.stages.split(","):
            cmd = [sys.executable, __file__, "--one", f"{config}:{stage}", "--batch", str(batch), "--steps",
                   str(steps), "--warmup", str(args.warmup), "--device", args.device, "--amp", args.amp,
                   "--threads", str(args.threads), *(["--compile"] if args.compile else [])]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-2000:], file=sys.stderr)
                return done.returncode
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    cols = ["config", "stage", "device", "compile", "batch", "samples_per_s", "step_s", "warmup_s", "peak_rss_mb",
            "peak_gpu_mem_mb", "mfu"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
