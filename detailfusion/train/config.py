"""Typed configs for the three training stages (``params.yaml`` sections).

``model`` picks the architecture and the ablation variant; ``stage1_detail``,
``stage2_branches`` and ``stage3_fusion`` each hold the data, objective and loop settings of
one stage, so DVC reruns only the stage whose knobs changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal


@dataclass
class ModelSection:
    arch: str  # config name in detailfusion/models/configs, or a path to a JSON config
    variant: str  # ablation variant (detailfusion.models.list_variants())
    pretrained: str | None  # open_clip pretrained tag or local checkpoint (null: the arch's own); overrides the arch's

    def validate(self) -> None:
        # checked when params.yaml is read, before any data is touched (a stage that only loads a
        # saved model would otherwise fail late, after its caching work)
        from detailfusion.models.variants import list_variants

        if self.variant not in list_variants():
            raise ValueError(f"variant: {self.variant!r} is unknown; choose from {list_variants()}")


@dataclass
class LoopConfig:
    """One training loop for every stage: optimiser, schedule, precision, checkpoints.

    Every field but the three in :attr:`NOT_PARAMS` is a ``params.yaml`` key without a default
    here. Those three are deliberately not params (they say where and how verbosely a run goes,
    not what it computes), so they keep a default and a params file may still set them.
    """

    NOT_PARAMS: ClassVar[tuple[str, ...]] = ("device", "log_every", "num_threads")

    max_steps: int
    batch_size: int
    lr: float  # new modules (branches, compositor)
    lr_backbone: float  # the open_clip backbone (0 freezes it; 1e-5 for pretrained real runs)
    weight_decay: float
    beta1: float
    beta2: float
    warmup_steps: int
    schedule: Literal["cosine", "onecycle", "constant"]
    min_lr_ratio: float
    grad_accum: int
    grad_clip: float
    # auto: bf16 on CUDA; on a CPU with AVX512-BF16 and no AMX matmul-bf16 (fp32 tensors, oneDNN's
    # matrix products, which stay fp32 there), else off (fp32)
    amp: Literal["auto", "bf16", "fp16", "matmul-bf16", "off"]
    checkpoint_every: int
    seed: int
    device: str = "auto"  # not a param: auto | cpu | cuda | cuda:N (auto: the rank's GPU, else CPU)
    log_every: int = 10  # not a param: steps between on_log calls (MLflow train/* metrics)
    num_threads: int = 0  # not a param: torch CPU threads; 0 = all cores

    def validate(self) -> None:
        if self.max_steps < 0:
            raise ValueError(f"max_steps: must be >= 0, got {self.max_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not self.lr_backbone >= 0:
            raise ValueError(f"lr_backbone: must be >= 0 (0 freezes the backbone), got {self.lr_backbone}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.max_steps and self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps: {self.warmup_steps} is not shorter than the run (max_steps "
                             f"{self.max_steps})")
        if self.batch_size < 2:
            raise ValueError(f"batch_size: must be >= 2 (in-batch negatives), got {self.batch_size}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum: must be >= 1, got {self.grad_accum}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size: {self.batch_size} is not divisible by grad_accum ({self.grad_accum})")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip: must be >= 0, got {self.grad_clip}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every: must be >= 1, got {self.checkpoint_every}")
        if self.log_every < 1:
            raise ValueError(f"log_every: must be >= 1, got {self.log_every}")


@dataclass
class Stage1Config:
    """DI pretraining on IPr2Pr-format atomic edits with the detail-oriented objective."""

    dataset: str
    split: str
    mask_ratio: float  # share of patches masked identically in reference and target
    group_by_original: bool  # other edits of the same original in the batch (hard negatives)
    loop: LoopConfig

    def validate(self) -> None:
        if not 0 <= self.mask_ratio < 1:
            raise ValueError(f"mask_ratio: must be in [0, 1), got {self.mask_ratio}")


@dataclass
class Stage2Config:
    """GM + DI fine-tuning on the target data set (CIRR- or FashionIQ-format)."""

    dataset: Literal["cirr", "fashioniq"]
    split: str
    hard_negatives: int  # CIRR set members per query used as extra negatives for DI
    fused_loss_weight: float  # InfoNCE on the 0.5/0.5 fused query (joint training)
    # Variants that skip stage 1 get its steps here, so every variant has the same step budget.
    equalize_budget: bool
    # Earlier batches' target embeddings kept as extra negatives of every stage-2 loss (0 = off).
    bank_size: int
    loop: LoopConfig

    def validate(self) -> None:
        if not 0 <= self.hard_negatives <= 4:
            raise ValueError(f"hard_negatives: must be in 0..4 (a CIRR set has 4 other members), got {self.hard_negatives}")
        if self.bank_size < 0:
            raise ValueError(f"bank_size: must be >= 0 (0 = no target bank), got {self.bank_size}")
        if self.fused_loss_weight < 0:
            raise ValueError(f"fused_loss_weight: must be >= 0, got {self.fused_loss_weight}")


@dataclass
class Stage3Config:
    """AFC training on cached, frozen branch outputs."""

    cache_queries: int  # training queries whose branch outputs are cached (0 = all)
    # gallery: the fused query is scored against every image of the cache (full softmax);
    # batch: against the batch's targets plus ``hard_negatives`` set members per query
    negatives: Literal["gallery", "batch"]
    hard_negatives: int
    loop: LoopConfig

    def validate(self) -> None:
        if self.cache_queries < 0:
            raise ValueError(f"cache_queries: must be >= 0, got {self.cache_queries}")
        if not 0 <= self.hard_negatives <= 4:
            raise ValueError(f"hard_negatives: must be in 0..4, got {self.hard_negatives}")


@dataclass
class PretrainConfig:
    """``params.yaml`` section ``pretrain_backbone`` (:mod:`detailfusion.train.pretrain`)."""

    out: str
    seed: int  # the pairs' random stream (independent of the CIR splits' streams)
    scenes: int  # object scenes with full descriptions (CIRR / IPr2Pr domain)
    garments: int  # garments with full descriptions (FashionIQ domain)
    heldout: int  # pairs per domain kept out of training for the stage's retrieval metric
    loop: LoopConfig

    def validate(self) -> None:
        if self.scenes < 0 or self.garments < 0:
            raise ValueError("scenes and garments must be >= 0")
        if self.heldout < 1:
            raise ValueError(f"heldout: must be >= 1, got {self.heldout}")
        for name, n in (("scenes", self.scenes), ("garments", self.garments)):
            if 0 < n <= self.heldout:
                raise ValueError(f"{name} ({n}) must exceed heldout ({self.heldout}) or be 0")
        if self.scenes + self.garments == 0:
            raise ValueError("scenes + garments must be > 0")
