"""Fusion of the GM and DI query embeddings: the Adaptive Feature Compositor and the fixed average.

The AFC reads the token-level outputs of both branches through a small transformer encoder and
turns its CLS output into per-query softmax weights over the two branches (``gate: scalar``) or
over the two branches per embedding dimension (``gate: per_dim``). Its last layer starts at zero,
so an untrained AFC is exactly the 0.5/0.5 average and stage 3 starts from the stage-2 model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from detailfusion.models.config import CompositorConfig


def weighted_fusion(
    q_gm: torch.Tensor, q_di: torch.Tensor, w_gm: torch.Tensor, w_di: torch.Tensor
) -> torch.Tensor:
    """``normalize(w_gm * norm(q_gm) + w_di * norm(q_di))``; weights broadcast as ``[B, 1]`` or ``[B, D]``."""
    return F.normalize(w_gm * F.normalize(q_gm, dim=-1) + w_di * F.normalize(q_di, dim=-1), dim=-1)


def average_fusion(q_gm: torch.Tensor, q_di: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed 0.5/0.5 fusion -> (query ``[B, D]``, weights ``[B, 2]``)."""
    weights = q_gm.new_full((q_gm.shape[0], 2), 0.5)
    return weighted_fusion(q_gm, q_di, weights[:, :1], weights[:, 1:]), weights


class AdaptiveFeatureCompositor(nn.Module):
    """Per-query branch weights from ``[CLS; GM tokens; DI tokens]``.

    Each branch's tokens get their own input projection to ``width`` plus a learned segment
    embedding, so attention can tell the branches apart.
    """

    def __init__(self, cfg: CompositorConfig, *, gm_token_width: int, di_token_width: int, embed_dim: int):
        super().__init__()
        self.gate = cfg.gate
        self.embed_dim = embed_dim
        self.gm_in = nn.Linear(gm_token_width, cfg.width)
        self.di_in = nn.Linear(di_token_width, cfg.width)
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.width) * 0.02)
        self.segment = nn.Parameter(torch.randn(2, cfg.width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.width,
            cfg.heads,
            dim_feedforward=round(cfg.width * cfg.mlp_ratio),
            dropout=cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)
        out_dim = 2 if cfg.gate == "scalar" else 2 * embed_dim
        self.head = nn.Sequential(nn.Linear(cfg.width, cfg.width), nn.GELU(), nn.Linear(cfg.width, out_dim))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(
        self, q_gm: torch.Tensor, q_di: torch.Tensor, gm_tokens: torch.Tensor, di_tokens: torch.Tensor
    ) -> dict[str, torch.Tensor | None]:
        """-> ``query [B, D]`` (unit), ``weights [B, 2]`` (w_gm, w_di; mean over dims for per_dim),
        ``gates [B, 2, D]`` (per_dim only, else None)."""
        batch = q_gm.shape[0]
        tokens = torch.cat(
            [
                self.cls_token.expand(batch, -1, -1),
                self.gm_in(gm_tokens) + self.segment[0],
                self.di_in(di_tokens) + self.segment[1],
            ],
            dim=1,
        )
        cls = self.norm(self.encoder(tokens)[:, 0])
        logits = self.head(cls)
        if self.gate == "scalar":
            weights = logits.softmax(dim=-1)
            query = weighted_fusion(q_gm, q_di, weights[:, :1], weights[:, 1:])
            return {"query": query, "weights": weights, "gates": None}
        gates = logits.view(batch, 2, self.embed_dim).softmax(dim=1)
        query = weighted_fusion(q_gm, q_di, gates[:, 0], gates[:, 1])
        return {"query": query, "weights": gates.mean(dim=-1), "gates": gates}
