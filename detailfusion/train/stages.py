"""The three training stages as DVC-callable entry points (``detailfusion train stageN``).

Each stage reads its own ``params.yaml`` section plus ``model``, loads the previous stage's
model, trains one task with the shared loop, and writes ``models/stageN/model`` (safetensors +
config), ``models/stageN/summary.json`` and ``metrics/stageN.json``. These are DVC outputs, so
they hold results only: clock readings (the loop's seconds, samples/s) go to ``reports/timings/`` and MLflow
(:mod:`detailfusion.timings`), with the stage's phases (``load_data``, ``train``, ``validate``,
``write``...). Checkpoints for resume live in ``models/checkpoints/<stage>-<config hash>/``
outside DVC's outputs (DVC deletes outputs before rerunning a stage, which would defeat resuming
after an interruption).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from detailfusion import timings
from detailfusion.config import to_dict
from detailfusion.errors import ConfigError
from detailfusion.fsutil import write_stage_outputs
from detailfusion.pipeline import METHOD_STAGES, is_main_process
from detailfusion.train.config import LoopConfig, ModelSection
from detailfusion.train.data import StepSampler, build_triplets
from detailfusion.train.loop import resolve_device, run_training
from detailfusion.train.tasks import BranchFinetuneTask, DetailPretrainTask, FusionTask

log = logging.getLogger(__name__)


def _config_hash(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build_model(section: ModelSection, seed: int):
    """Seeded model construction from the ``model`` params section."""
    from detailfusion.models import create_model, get_model_config, list_variants

    if section.variant not in list_variants():
        raise ConfigError(f"params.yaml: model.variant '{section.variant}' is unknown; choose from {list_variants()}")
    cfg = get_model_config(section.arch)
    if section.pretrained is not None:
        cfg.backbone.pretrained = section.pretrained
    torch.manual_seed(seed)
    return create_model(cfg, variant=section.variant)


def _save_stage(model, out_dir: Path, summary: dict, metrics_path: Path, metrics: dict) -> None:
    from detailfusion.models.io import save_pretrained

    write_stage_outputs(out_dir, summary, metrics_path, metrics, lambda folder: save_pretrained(model, folder / "model"))


class StageContext:
    """The checked ``params.yaml`` (:class:`detailfusion.params.Params`, loaded once by the CLI) and
    the paths the stage runners share; ``prepared_dir`` defaults to ``prepare.out``."""

    def __init__(self, params, models_dir: str | Path = "models", metrics_dir: str | Path = "metrics",
                 prepared_dir: str | Path | None = None):
        self.params = params
        self.params_path = Path(params.source)
        self.model_section: ModelSection = params.model
        self.models_dir = Path(models_dir)
        self.metrics_dir = Path(metrics_dir)
        self.prepared_dir = Path(prepared_dir or params.prepare.out)

    def variant(self):
        from detailfusion.models import VARIANTS, list_variants

        name = self.model_section.variant
        if name not in VARIANTS:
            raise ConfigError(f"{self.params_path}: model.variant '{name}' is unknown; choose from {list_variants()}")
        return VARIANTS[name]

    def checkpoint_dir(self, stage: str, run_config: dict) -> Path:
        return self.models_dir / "checkpoints" / f"{stage}-{_config_hash(run_config)}"


def stage2_loop(params) -> LoopConfig:
    """Stage 2's loop as it runs: with stage 1's steps added when the variant skips stage 1 and
    ``stage2_branches.equalize_budget`` is on (every variant then trains the same number of steps)."""
    from detailfusion.models import VARIANTS

    cfg = params.stage2_branches
    if cfg.equalize_budget and not VARIANTS[params.model.variant].stage1:
        return replace(cfg.loop, max_steps=cfg.loop.max_steps + params.stage1_detail.loop.max_steps)
    return cfg.loop


def effective_config(params, stage: str) -> dict:
    """The sections a training stage runs with, every value filled in (stage 2's loop after
    :func:`stage2_loop`): MLflow logs this as the run's params, and its hash names the stage's
    resume checkpoint folder."""
    cfg = getattr(params, stage)
    if stage == "stage2_branches":
        cfg = replace(cfg, loop=stage2_loop(params))
    return {"model": to_dict(params.model), stage: to_dict(cfg)}


def _validate(model, prepared, progress: bool) -> dict:
    from detailfusion.eval.evaluate import quick_validation

    with timings.phase("validate"):
        return quick_validation(model, prepared, progress=progress) if is_main_process() else {}


def _finish(ctx: StageContext, stage: str, model, summary: dict, extra_metrics: dict, ckpt_dir: Path) -> dict:
    n = METHOD_STAGES.index(stage) + 1
    summary = timings.split_run_facts(summary)  # outputs hold results only: DVC hashes them
    metrics = {"stage": stage, "variant": ctx.model_section.variant, **summary, **extra_metrics}
    if is_main_process():
        with timings.phase("write"):
            _save_stage(model, ctx.models_dir / f"stage{n}", summary, ctx.metrics_dir / f"stage{n}.json",
                        metrics)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    return metrics


def run_stage1(ctx: StageContext, progress: bool = True, on_log=None) -> dict:
    from detailfusion.data.prepared import load_prepared

    cfg = ctx.params.stage1_detail
    variant = ctx.variant()
    with timings.phase("build_model"):
        model = build_model(ctx.model_section, cfg.loop.seed)
    run_config = effective_config(ctx.params, "stage1_detail")
    ckpt_dir = ctx.checkpoint_dir("stage1_detail", run_config)
    if not variant.stage1 or model.di is None:
        reason = "variant skips stage 1" if not variant.stage1 else "variant has no DI branch"
        summary = {"skipped": True, "reason": reason, "steps": 0}
        return _finish(ctx, "stage1_detail", model, summary, {}, ckpt_dir)

    with timings.phase("load_data"):
        prepared = load_prepared(ctx.prepared_dir, cfg.dataset)
        triplets = build_triplets(prepared, cfg.split)
    detail_opt = variant.detail_opt
    mask_ratio = cfg.mask_ratio if detail_opt else 0.0
    grouped = cfg.group_by_original and detail_opt
    sampler = StepSampler(triplets.group, cfg.loop.batch_size, cfg.loop.seed, grouped=grouped)
    task = DetailPretrainTask(model, triplets, prepared.pixels, sampler, cfg.loop.seed, mask_ratio=mask_ratio)
    with timings.phase("train"):
        summary = run_training(task, cfg.loop, ckpt_dir, run_config=run_config, on_log=on_log,
                               progress=progress)
    summary.update({"skipped": False, "mask_ratio": mask_ratio, "grouped_hard_negatives": grouped,
                    "train_queries": len(triplets), "dropped_queries": triplets.dropped})
    return _finish(ctx, "stage1_detail", model, summary, {}, ckpt_dir)


def run_stage2(ctx: StageContext, progress: bool = True, on_log=None) -> dict:
    from detailfusion.data.prepared import load_prepared
    from detailfusion.models.io import load_pretrained

    cfg = ctx.params.stage2_branches
    with timings.phase("load_model"):
        model = load_pretrained(ctx.models_dir / "stage1" / "model")
    loop = stage2_loop(ctx.params)  # a variant with stage 1 has a DI branch: stage 1 ran
    run_config = effective_config(ctx.params, "stage2_branches")
    ckpt_dir = ctx.checkpoint_dir("stage2_branches", run_config)

    with timings.phase("load_data"):
        prepared = load_prepared(ctx.prepared_dir, cfg.dataset)
        triplets = build_triplets(prepared, cfg.split)
    task = stage2_task(model, prepared, triplets, cfg, loop)
    with timings.phase("train"):
        summary = run_training(task, loop, ckpt_dir, run_config=run_config, on_log=on_log, progress=progress)
    summary.update({"train_queries": len(triplets), "dropped_queries": triplets.dropped,
                    "equalized_budget": loop.max_steps != cfg.loop.max_steps})
    val = _validate(model, prepared, progress)
    return _finish(ctx, "stage2_branches", model, summary, {"val": val}, ckpt_dir)


def stage2_task(model, prepared, triplets, cfg, loop: LoopConfig, bank_size: int | None = None) -> BranchFinetuneTask:
    """Stage 2's task on ``prepared`` (a ``Stage2Config`` ``cfg``, its effective ``loop``): set
    members as extra negatives where the data set has sets (CIRR), a random one of FashionIQ's
    two captions per step, and a target bank (``bank_size``, default ``cfg.bank_size``) that
    leaves a query's reference out only where the ranking drops it."""
    from detailfusion.data.manifest import ranking_drops_reference

    sampler = StepSampler(triplets.group, loop.batch_size, loop.seed, grouped=False)
    return BranchFinetuneTask(
        model, triplets, prepared.pixels, sampler, loop.seed,
        hard_negatives=cfg.hard_negatives if cfg.dataset == "cirr" else 0,
        fused_loss_weight=cfg.fused_loss_weight,
        fiq_random_captions=cfg.dataset == "fashioniq",
        bank_size=cfg.bank_size if bank_size is None else bank_size,
        exclude_reference=ranking_drops_reference(cfg.dataset),
    )


def cache_branch_outputs(model, triplets, pixels, batch_size: int = 256, progress: bool = True,
                         gallery: bool = False) -> dict:
    """Frozen branch outputs + target/negative embeddings for every triplet (stage 3's input).

    Targets and negatives are gallery images that recur: every member of a set is the target
    or a hard negative of several queries. Each distinct image is embedded once and the rows
    index into those embeddings (the encoder is row-wise, so this gives the same vectors as
    embedding every occurrence; ``tests/test_train.py`` checks it), several times fewer images
    than one per (query, negative) slot.

    With ``gallery`` the references join the embedded images, and the cache also holds that
    table (``gallery`` ``[G, D]``, one row per distinct image) with each query's
    ``target_index`` and ``reference_index`` into it, for an objective over the whole table.
    """
    from tqdm.auto import tqdm

    from detailfusion.data.pixels import gather_pixels
    from detailfusion.retrieval.embed import BRANCH_KEYS, embed_gallery, encode_queries

    model.eval()
    tokens = model.tokenize(triplets.texts)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in BRANCH_KEYS}
    for s in tqdm(range(0, len(triplets), batch_size), desc="cache branches", disable=not progress):
        rows = np.arange(s, min(s + batch_size, len(triplets)))
        out = encode_queries(model, gather_pixels(pixels, triplets.ref[rows]), tokens[rows], keys=BRANCH_KEYS,
                             fuse=False)
        for k in BRANCH_KEYS:
            parts[k].append(out[k])
    cache = {k: torch.cat(v) for k, v in parts.items()}
    negs = triplets.negatives
    valid = negs >= 0
    images = np.unique(np.concatenate([triplets.target, negs[valid]] + ([triplets.ref] if gallery else [])))
    # Even chunks of at most batch_size: no short last chunk (CPU matmul kernels switch at small
    # row counts, which moves the last bits; large chunks give bitwise the per-occurrence vectors).
    even = -(-len(images) // max(1, -(-len(images) // batch_size)))
    emb = torch.from_numpy(embed_gallery(model, pixels, images, even, progress, desc="cache gallery"))
    target_index = torch.from_numpy(np.searchsorted(images, triplets.target))
    cache["target"] = emb[target_index]
    slots = emb[torch.from_numpy(np.searchsorted(images, np.where(valid, negs, images[0])))]
    cache["negatives"] = slots * torch.from_numpy(valid).unsqueeze(-1).float()  # padding slots: zero vectors
    if gallery:
        cache["gallery"] = emb
        cache["target_index"] = target_index
        cache["reference_index"] = torch.from_numpy(np.searchsorted(images, triplets.ref))
    return cache


def run_stage3(ctx: StageContext, progress: bool = True, on_log=None) -> dict:
    from detailfusion.data.manifest import ranking_drops_reference
    from detailfusion.data.prepared import load_prepared
    from detailfusion.models.io import load_pretrained

    cfg = ctx.params.stage3_fusion
    s2 = ctx.params.stage2_branches
    with timings.phase("load_model"):
        model = load_pretrained(ctx.models_dir / "stage2" / "model")
    run_config = effective_config(ctx.params, "stage3_fusion")
    ckpt_dir = ctx.checkpoint_dir("stage3_fusion", run_config)
    with timings.phase("load_data"):
        prepared = load_prepared(ctx.prepared_dir, s2.dataset)
    if model.afc is None:
        summary = {"skipped": True, "reason": f"variant '{ctx.model_section.variant}' has no compositor", "steps": 0}
        val = _validate(model, prepared, progress)
        return _finish(ctx, "stage3_fusion", model, summary, {"val": val}, ckpt_dir)

    with timings.phase("load_data"):
        triplets = build_triplets(prepared, s2.split)
    if cfg.cache_queries and cfg.cache_queries < len(triplets):
        rows = np.sort(np.random.default_rng(cfg.loop.seed).choice(len(triplets), cfg.cache_queries, replace=False))
        triplets = triplets.subset(rows)
    device = resolve_device(cfg.loop.device)
    model.to(device)
    with timings.phase("cache_branches"):
        cache = cache_branch_outputs(model, triplets, prepared.pixels, progress=progress,
                                     gallery=cfg.negatives == "gallery")
    model.cpu()
    sampler = StepSampler(np.full(len(triplets), -1), cfg.loop.batch_size, cfg.loop.seed)
    # CIRR's ranking leaves the reference out; FashionIQ's keeps it, so there it is a negative
    task = FusionTask(model, cache, sampler, cfg.loop.seed, hard_negatives=cfg.hard_negatives,
                      exclude_reference=ranking_drops_reference(s2.dataset))
    with timings.phase("train"):
        summary = run_training(task, cfg.loop, ckpt_dir, run_config=run_config, on_log=on_log,
                               progress=progress)
    summary.update({"skipped": False, "cached_queries": len(triplets), "negatives": cfg.negatives,
                    "gallery_images": int(task.gallery.shape[0]) if task.gallery is not None else 0})
    model.cpu()
    val = _validate(model, prepared, progress)
    return _finish(ctx, "stage3_fusion", model, summary, {"val": val}, ckpt_dir)


RUNNERS = {"stage1_detail": run_stage1, "stage2_branches": run_stage2, "stage3_fusion": run_stage3}
