"""The DetailFusion retrieval model: backbone, GM and DI branches, compositor and temperature.

Query side: the reference image and caption go through the shared backbone, then the branches the
variant builds, then the fusion (AFC, fixed average, or a single branch). Target side: one
embedding, ``normalize(pooled image)``, serves every branch and the fused query, so one gallery
index scores them all. Scores are ``cos(q, t) * logit_scale``.

``branch_outputs`` and ``fuse`` split the query path so stage 3 can cache frozen branch outputs
and train the compositor on them alone.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from detailfusion.models.backbone import ClipBackbone
from detailfusion.models.branches import DetailInferenceBranch, GlobalMatchingBranch
from detailfusion.models.compositor import AdaptiveFeatureCompositor, average_fusion
from detailfusion.models.config import ModelConfig
from detailfusion.models.variants import ModelVariant, get_variant

INIT_TEMPERATURE = 0.07
MAX_LOGIT_SCALE = 100.0

BranchOutputs = dict[str, torch.Tensor | None]


class DetailFusionModel(nn.Module):
    """DetailFusion for one architecture config and one variant (see :mod:`detailfusion.models.variants`).

    Modules: ``backbone`` (:class:`ClipBackbone`), ``gm`` / ``di`` (None when the variant does
    not build that branch), ``afc`` (None unless ``variant.fusion == "afc"``), ``logit_scale_log``.
    """

    def __init__(
        self, config: ModelConfig, variant: str | ModelVariant = "full", *, load_backbone_weights: bool = True
    ):
        super().__init__()
        self.variant: ModelVariant = get_variant(variant)
        self.backbone = ClipBackbone(config.backbone, load_weights=load_backbone_weights)
        # Record the resolved normalisation so a rebuild from the saved config (without the
        # pretrained tag's metadata) preprocesses exactly as this model does.
        self.config: ModelConfig = dataclasses.replace(
            config,
            backbone=dataclasses.replace(
                config.backbone, mean=list(self.backbone.mean), std=list(self.backbone.std)
            ),
        )
        dim = self.backbone.embed_dim
        self.gm = GlobalMatchingBranch(dim, config.gm) if self.variant.has_gm else None
        self.di = (
            DetailInferenceBranch(
                config.di,
                text_width=self.backbone.text_width,
                vision_width=self.backbone.vision_width,
                embed_dim=dim,
            )
            if self.variant.has_di
            else None
        )
        self.afc = (
            AdaptiveFeatureCompositor(
                config.afc,
                gm_token_width=self.gm.token_width,
                di_token_width=self.di.token_width,
                embed_dim=dim,
            )
            if self.variant.fusion == "afc"
            else None
        )
        self.logit_scale_log = nn.Parameter(torch.tensor(math.log(1.0 / INIT_TEMPERATURE)))

    # ---------------------------------------------------------------- properties
    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    @property
    def image_size(self) -> int:
        return self.backbone.image_size

    @property
    def num_patches(self) -> int:
        return self.backbone.num_patches

    @property
    def logit_scale(self) -> torch.Tensor:
        """``exp(logit_scale_log)`` clamped at 100 (1 / temperature)."""
        return self.logit_scale_log.exp().clamp(max=MAX_LOGIT_SCALE)

    # ---------------------------------------------------------------- inputs
    def tokenize(self, texts: list[str]) -> torch.LongTensor:
        return self.backbone.tokenize(texts)

    def preprocess_uint8(self, images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.backbone.preprocess_uint8(images_uint8)

    # ---------------------------------------------------------------- encoders
    def encode_target(self, images: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Target images ``[B, 3, S, S]`` -> unit embeddings ``[B, D]``."""
        pooled, _ = self.backbone.encode_image(images, patch_mask)
        return F.normalize(pooled, dim=-1)

    def branch_outputs(
        self, ref_images: torch.Tensor, tokens: torch.Tensor, patch_mask: torch.Tensor | None = None
    ) -> BranchOutputs:
        """Unfused branch outputs: ``gm``/``di`` ``[B, D]`` (unit) and ``gm_tokens``/``di_tokens``.

        A branch the variant does not build gives None for its two entries.
        """
        image_emb, patch_tokens = self.backbone.encode_image(ref_images, patch_mask)
        text_emb, text_feats, text_mask = self.backbone.encode_text(tokens)
        out: BranchOutputs = {"gm": None, "di": None, "gm_tokens": None, "di_tokens": None}
        if self.gm is not None:
            q_gm, out["gm_tokens"] = self.gm(image_emb, text_emb)
            out["gm"] = F.normalize(q_gm, dim=-1)
        if self.di is not None:
            q_di, out["di_tokens"] = self.di(text_feats, text_mask, patch_tokens)
            out["di"] = F.normalize(q_di, dim=-1)
        return out

    def fuse(self, branch_out: BranchOutputs) -> BranchOutputs:
        """Fusion only (works on cached branch outputs) -> ``query [B, D]``, ``weights [B, 2] | None``,
        ``gates [B, 2, D] | None`` (per-dimension AFC gates)."""
        fusion = self.variant.fusion
        if fusion in ("gm", "di"):
            # Branch outputs are already unit vectors: a single-branch query is that branch's output.
            return {"query": branch_out[fusion], "weights": None, "gates": None}
        if fusion == "avg":
            query, weights = average_fusion(branch_out["gm"], branch_out["di"])
            return {"query": query, "weights": weights, "gates": None}
        return self.afc(branch_out["gm"], branch_out["di"], branch_out["gm_tokens"], branch_out["di_tokens"])

    def encode_query(
        self, ref_images: torch.Tensor, tokens: torch.Tensor, patch_mask: torch.Tensor | None = None
    ) -> BranchOutputs:
        """Reference images + caption tokens -> ``query`` (unit, fused), ``gm``, ``di``, ``weights``,
        ``gates``, ``gm_tokens``, ``di_tokens`` (None where the variant has no such output)."""
        out = self.branch_outputs(ref_images, tokens, patch_mask)
        out.update(self.fuse(out))
        return out

    def forward(self, ref_images: torch.Tensor, tokens: torch.Tensor) -> BranchOutputs:
        return self.encode_query(ref_images, tokens)

    def similarity(self, query: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Logits ``[Bq, Bt] = logit_scale * query @ target.T`` for unit embeddings."""
        return self.logit_scale * query @ target.t()

    # ---------------------------------------------------------------- optimisation
    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters by module (``backbone.visual.ln_pre.weight``, ...), for per-module
        learning rates, weight-decay rules that go by name, and freezing (absent modules: [])."""

        def named(prefix: str, module: nn.Module | None) -> list[tuple[str, nn.Parameter]]:
            return [(f"{prefix}.{n}", p) for n, p in module.named_parameters()] if module is not None else []

        return {
            "backbone": named("backbone", self.backbone),
            "gm": named("gm", self.gm),
            "di": named("di", self.di),
            "afc": named("afc", self.afc),
            "other": [("logit_scale_log", self.logit_scale_log)],
        }
