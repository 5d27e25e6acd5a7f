"""The two query branches of DetailFusion.

* :class:`GlobalMatchingBranch` (GM): a CLIP4Cir combiner over the pooled reference-image and
  text embeddings -> ``q_gm [B, D]`` plus three tokens for the compositor.
* :class:`DetailInferenceBranch` (DI): a BLIP-2 Q-Former whose learnable queries and the caption's
  token features attend to each other while only the queries cross-attend to the reference's
  patch tokens -> ``q_di [B, D]`` plus the ``K`` query outputs for the compositor.

Both return unnormalised embeddings; the model normalises them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from detailfusion.models.config import DetailInferenceConfig, GlobalMatchingConfig


class GlobalMatchingBranch(nn.Module):
    """CLIP4Cir combiner: ``out = MLP([p(img); p(txt)]) + lambda * txt + (1 - lambda) * img``.

    ``lambda`` is a per-query scalar in (0, 1) predicted from the projected pair. The tokens handed
    to the compositor (width ``token_width = D``) are the image embedding, the text embedding and
    the MLP output, i.e. both inputs and what the combiner made of them.
    """

    def __init__(self, embed_dim: int, cfg: GlobalMatchingConfig):
        super().__init__()
        self.token_width = embed_dim
        self.image_proj = nn.Linear(embed_dim, cfg.proj_dim)
        self.text_proj = nn.Linear(embed_dim, cfg.proj_dim)
        self.combiner = nn.Linear(2 * cfg.proj_dim, cfg.hidden_dim)
        self.output = nn.Linear(cfg.hidden_dim, embed_dim)
        self.mixing = nn.Sequential(
            nn.Linear(2 * cfg.proj_dim, cfg.hidden_dim),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden_dim, 1),
            nn.Sigmoid(),
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled ``[B, D]`` image and text embeddings -> (``q_gm [B, D]``, tokens ``[B, 3, D]``)."""
        # Unit inputs keep the lambda-residual a balanced mix whatever the towers' output norms.
        image_emb = F.normalize(image_emb, dim=-1)
        text_emb = F.normalize(text_emb, dim=-1)
        pair = torch.cat(
            [
                self.dropout(F.relu(self.image_proj(image_emb))),
                self.dropout(F.relu(self.text_proj(text_emb))),
            ],
            dim=-1,
        )
        combined = self.output(self.dropout(F.relu(self.combiner(pair))))
        lam = self.mixing(pair)
        q_gm = combined + lam * text_emb + (1.0 - lam) * image_emb
        tokens = torch.stack([image_emb, text_emb, combined], dim=1)
        return q_gm, tokens


class DetailInferenceBranch(nn.Module):
    """Q-Former over the reference's patch tokens, conditioned on the caption's token features.

    The sequence fed to ``Blip2QFormerModel`` is ``[K query tokens; projected text tokens]`` with
    ``query_length = K``: all of it self-attends (text padding masked), only the queries
    cross-attend to the patches, queries and text have separate feed-forward weights (BLIP-2's
    ``*_query`` layers). ``q_di = Linear(LN(mean of the K query outputs))``.
    """

    def __init__(self, cfg: DetailInferenceConfig, *, text_width: int, vision_width: int, embed_dim: int):
        super().__init__()
        self.num_queries = cfg.num_queries
        self.token_width = cfg.hidden_size
        qformer_cfg = Blip2QFormerConfig(
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
            cross_attention_frequency=cfg.cross_attention_frequency,
            encoder_hidden_size=vision_width,
            # Builds the text-side feed-forward layers that the appended caption tokens go through.
            use_qformer_text_input=True,
        )
        self.query_tokens = nn.Parameter(
            torch.randn(1, cfg.num_queries, cfg.hidden_size) * qformer_cfg.initializer_range
        )
        self.text_proj = nn.Linear(text_width, cfg.hidden_size)
        self.qformer = Blip2QFormerModel(qformer_cfg)
        self.norm = nn.LayerNorm(cfg.hidden_size)
        self.head = nn.Linear(cfg.hidden_size, embed_dim)

    def forward(
        self, text_feats: torch.Tensor, text_mask: torch.Tensor, patch_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text ``[B, L, W_t]`` + mask ``[B, L]`` + patches ``[B, N, W_v]`` -> (``q_di [B, D]``, ``[B, K, H]``)."""
        batch = text_feats.shape[0]
        queries = self.query_tokens.expand(batch, -1, -1)
        sequence = torch.cat([queries, self.text_proj(text_feats)], dim=1)
        mask = torch.cat([text_mask.new_ones(batch, self.num_queries), text_mask], dim=1).long()
        hidden = self.qformer(
            query_embeds=sequence,
            query_length=self.num_queries,
            attention_mask=mask,
            encoder_hidden_states=patch_tokens,
        ).last_hidden_state
        query_out = hidden[:, : self.num_queries]
        return self.head(self.norm(query_out.mean(dim=1))), query_out
