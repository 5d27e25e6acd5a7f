"""Stage 2's target bank (``stage2_branches.bank_size``), looked at from the inside: how the
embedding space moves in the first steps of stage 2 with and without the bank.

For each bank size it starts stage 2 exactly as the pipeline does (the committed
``models/stage1`` model, the prepared CIRR-format training split, ``params.yaml``'s stage-2
loop with ``BranchFinetuneTask`` and the same optimiser, schedule and seed), runs
``--steps`` optimiser steps, and every ``--every`` steps measures on one fixed batch of 64
training queries that no step trains on (drawn at step 10,000 of the sampler):

- ``pos_cos``: mean cosine of each GM query to its own target;
- ``target_target_cos``: mean cosine between two different targets of that batch (0 for a
  spread-out space, 1 when every image maps to the same point);
- ``mean_target_norm``: length of the mean target embedding (the same concentration, one number);
- ``batch_r1``: share of those queries whose own target is the nearest of the 64;
- with a bank, ``bank_drift_cos``: mean cosine between each bank entry and the same image
  embedded by the current model (how stale the bank is).

Needs ``dvc repro stage1_detail`` (models/stage1, data/prepared). Writes
``bench/results/stage2_bank.json`` and prints a table; about 90 s per bank size on 2 cores.

    python bench/stage2_bank.py                      # bank sizes 0, 256, 1024; 60 steps
    python bench/stage2_bank.py --banks 0 64 --steps 30
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from detailfusion.data.prepared import load_prepared  # noqa: E402
from detailfusion.models.io import load_pretrained  # noqa: E402
from detailfusion.params import load_config  # noqa: E402
from detailfusion.train.data import build_triplets  # noqa: E402
from detailfusion.train.loop import build_optimizer, build_scheduler, train_step  # noqa: E402
from detailfusion.train.stages import stage2_task  # noqa: E402

PROBE_STEP = 10_000  # the fixed measurement batch: a sampler step far beyond the runs' steps


def measure(model, task, probe: dict, pixels) -> dict:
    with torch.no_grad():
        t = model.encode_target(model.preprocess_uint8(probe["target"]))
        q = model.branch_outputs(model.preprocess_uint8(probe["ref"]), probe["tokens"])["gm"]
        n = len(t)
        off = (t @ t.t())[~torch.eye(n, dtype=torch.bool)]
        out = {
            "pos_cos": float((q * t).sum(-1).mean()),
            "target_target_cos": float(off.mean()),
            "mean_target_norm": float(t.mean(0).norm()),
            "batch_r1": float(((q @ t.t()).argmax(1) == torch.arange(n)).float().mean()),
        }
        if task.bank.size and len(task.bank):
            filled = task.bank.index >= 0
            fresh = model.encode_target(model.preprocess_uint8(torch.as_tensor(pixels[task.bank.index[filled].numpy()])))
            out["bank_drift_cos"] = float((fresh * task.bank.emb[filled]).sum(-1).mean())
    return out


def run(bank_size: int, steps: int, every: int, params_path: Path) -> list[dict]:
    params = load_config(params_path)
    cfg = params.stage2_branches
    loop = cfg.loop
    torch.manual_seed(loop.seed)
    model = load_pretrained(REPO / "models" / "stage1" / "model")
    prepared = load_prepared(REPO / params.prepare.out, cfg.dataset)
    triplets = build_triplets(prepared, cfg.split)
    task = stage2_task(model, prepared, triplets, cfg, loop, bank_size=bank_size)  # as run_stage2 builds it
    optimizer = build_optimizer(task.optimizer_groups(loop.lr, loop.lr_backbone, loop.weight_decay), loop)
    scheduler = build_scheduler(optimizer, loop)
    probe = task.batch(PROBE_STEP, 0, 1, 0, 1)
    task.train()
    rows, last = [], {}
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            row = measure(model, task, probe, prepared.pixels)
            print(f"bank {bank_size} step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
            rows.append({"step": step, **row, "last_step_losses": last})
        if step < steps:
            logs, _ = train_step(task, optimizer, scheduler, loop, step, device=torch.device("cpu"))
            last = {k: round(v, 4) for k, v in logs.items()}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--banks", type=int, nargs="+", default=[0, 256, 1024])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "stage2_bank.json")
    args = ap.parse_args()
    if not (REPO / "models" / "stage1" / "model").is_dir():
        sys.exit("models/stage1/model: missing; run `dvc repro stage1_detail` first")
    results = {str(b): run(b, args.steps, args.every, args.params) for b in args.banks}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": args.steps, "banks": results}, indent=2) + "\n")
    print("\n| bank | step | pos cos | target-target cos | mean target norm | in-batch R@1 | bank drift cos |")
    print("|---|---|---|---|---|---|---|")
    for bank, rows in results.items():
        for r in rows:
            drift = f"{r['bank_drift_cos']:.3f}" if "bank_drift_cos" in r else ""
            print(f"| {bank} | {r['step']} | {r['pos_cos']:.3f} | {r['target_target_cos']:.3f} | "
                  f"{r['mean_target_norm']:.3f} | {r['batch_r1']:.3f} | {drift} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
