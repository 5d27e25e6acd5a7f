"""Typed configs for the three training stages (``params.yaml`` sections).

``model`` picks the architecture and the ablation variant; ``stage1_detail``,
``stage2_branches`` and ``stage3_fusion`` each hold the data, objective and loop settings of
one stage, so DVC reruns only the stage whose knobs changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelSection:
    arch: str = "tiny"  # config name in detailfusion/models/configs, or a path to a JSON config
    variant: str = "full"  # ablation variant (detailfusion.models.list_variants())
    pretrained: str | None = None  # open_clip pretrained tag or local checkpoint; overrides the arch's

    def validate(self) -> None:
        # checked when params.yaml is read, before any data is touched (a stage that only loads a
        # saved model would otherwise fail late, after its caching work)
        from detailfusion.models.variants import list_variants

        if self.variant not in list_variants():
            raise ValueError(f"variant: {self.variant!r} is unknown; choose from {list_variants()}")


@dataclass
class LoopConfig:
    """One training loop for every stage: optimiser, schedule, precision, checkpoints."""

    max_steps: int = 100
    batch_size: int = 64
    lr: float = 1e-3  # new modules (branches, compositor)
    lr_backbone: float = 1e-3  # the open_clip backbone (1e-5 for pretrained real runs)
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    warmup_steps: int = 20
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    grad_accum: int = 1
    grad_clip: float = 1.0
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    num_threads: int = 0  # torch CPU threads; 0 = all cores

    def validate(self) -> None:
        if self.max_steps < 0:
            raise ValueError("max_steps must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.lr_backbone >= 0:
            raise ValueError(f"lr_backbone must be >= 0 (0 freezes the backbone), got {self.lr_backbone}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        if self.max_steps and self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) is longer than the run (max_steps {self.max_steps})")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (in-batch negatives)")
        if self.grad_accum < 1:
            raise ValueError("grad_accum must be >= 1")
        if self.batch_size % self.grad_accum:
            raise ValueError("batch_size must be divisible by grad_accum")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("min_lr_ratio must be in [0, 1]")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every and log_every must be >= 1")


@dataclass
class Stage1Config:
    """DI pretraining on IPr2Pr-format atomic edits with the detail-oriented objective."""

    dataset: str = "ipr2pr"
    split: str = "train"
    mask_ratio: float = 0.5  # share of patches masked identically in reference and target
    group_by_original: bool = True  # other edits of the same original in the batch (hard negatives)
    loop: LoopConfig = field(default_factory=LoopConfig)

    def validate(self) -> None:
        if not 0 <= self.mask_ratio < 1:
            raise ValueError("mask_ratio must be in [0, 1)")


@dataclass
class Stage2Config:
    """GM + DI fine-tuning on the target data set (CIRR- or FashionIQ-format)."""

    dataset: Literal["cirr", "fashioniq"] = "cirr"
    split: str = "train"
    hard_negatives: int = 2  # CIRR set members per query used as extra negatives for DI
    fused_loss_weight: float = 1.0  # InfoNCE on the 0.5/0.5 fused query (joint training)
    # Variants that skip stage 1 get its steps here, so every variant has the same step budget.
    equalize_budget: bool = True
    loop: LoopConfig = field(default_factory=LoopConfig)

    def validate(self) -> None:
        if not 0 <= self.hard_negatives <= 4:
            raise ValueError("hard_negatives must be in 0..4 (a CIRR set has 4 other members)")
        if self.fused_loss_weight < 0:
            raise ValueError("fused_loss_weight must be >= 0")


@dataclass
class Stage3Config:
    """AFC training on cached, frozen branch outputs."""

    cache_queries: int = 8000  # training queries whose branch outputs are cached (0 = all)
    hard_negatives: int = 4
    loop: LoopConfig = field(default_factory=LoopConfig)

    def validate(self) -> None:
        if self.cache_queries < 0:
            raise ValueError("cache_queries must be >= 0")
        if not 0 <= self.hard_negatives <= 4:
            raise ValueError("hard_negatives must be in 0..4")
