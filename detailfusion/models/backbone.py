"""The open_clip backbone adapter: pooled embeddings plus the token features the DI branch needs.

:class:`ClipBackbone` wraps an open_clip ``CLIP`` (or ``CustomTextCLIP``) built from an inline
config dict or from an open_clip architecture name with a pretrained tag or local checkpoint. The
image path re-implements the open_clip ViT forward from its submodules so a ``patch_mask`` can
*drop* patches MAE-style (stage 1's detail objective hides the same random patches in reference
and target). Tokenisation uses open_clip's bundled BPE ``SimpleTokenizer``, so nothing touches a hub.
"""

from __future__ import annotations

import functools

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool
from torch import nn

from detailfusion.errors import ConfigError
from detailfusion.models.config import BackboneConfig

PAD_TOKEN_ID = 0  # SimpleTokenizer pads with 0 after the end-of-text token


@functools.lru_cache(maxsize=4)
def get_tokenizer(context_length: int) -> SimpleTokenizer:
    """The bundled CLIP BPE tokenizer (cached: building the BPE tables takes ~0.3 s)."""
    return SimpleTokenizer(context_length=context_length)


def _build_clip(cfg: BackboneConfig, load_weights: bool) -> nn.Module:
    checkpoint = cfg.pretrained if load_weights else None
    if cfg.arch is not None:
        try:
            # A tag is only resolved when weights are wanted: a rebuild from our own checkpoint
            # must not try to download anything.
            return open_clip.create_model(cfg.arch, pretrained=checkpoint, force_image_size=cfg.image_size)
        except RuntimeError as exc:
            raise ConfigError(
                f"open_clip architecture '{cfg.arch}' (pretrained={checkpoint!r}): {exc}"
            ) from exc
    clip_kwargs = dict(cfg.clip_config or {})
    model_cls = open_clip.CustomTextCLIP if clip_kwargs.pop("custom_text", False) else open_clip.CLIP
    try:
        model = model_cls(**clip_kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"backbone.clip_config is not a valid open_clip config: {exc}") from exc
    if checkpoint is not None:
        try:
            open_clip.load_checkpoint(model, checkpoint, strict=True, weights_only=True)
        except (RuntimeError, OSError, KeyError) as exc:
            raise ConfigError(f"{checkpoint}: cannot load as backbone weights: {exc}") from exc
    return model


_POOLS_BEFORE_PADDING = ("argmax", "eos", "first")


def real_token_mask(tokens: torch.Tensor, pad_token_id: int = PAD_TOKEN_ID) -> torch.Tensor:
    """True up to and including each row's last non-padding token (its end-of-text), False after.

    Going by position, not by token id alone: the CLIP BPE's id 0 is the padding id and also a
    real token (the "!" of "!;", for one), which must not be masked where it occurs."""
    real = tokens != pad_token_id
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    last = torch.where(real, positions, torch.full_like(positions, -1)).max(dim=1).values
    return positions.unsqueeze(0) <= last.unsqueeze(1)


def _padding_is_inert(text: nn.Module | None, clip: nn.Module) -> bool:
    """Whether the outputs at real tokens (and the pooled vector) are independent of trailing
    padding: a causal attention mask, and pooling at end-of-text or at the first token (not at
    the last position, nor CoCa's appended class token, which attend to the padding)."""
    if text is not None:
        return (getattr(text, "attn_mask", None) is not None and getattr(text, "cls_emb", None) is None
                and getattr(text, "pool_type", "argmax") in _POOLS_BEFORE_PADDING)
    return (getattr(clip, "attn_mask", None) is not None
            and getattr(clip, "text_pool_type", "argmax") in _POOLS_BEFORE_PADDING)


class ClipBackbone(nn.Module):
    """Image and text encoders of an open_clip model, exposing pooled and token features.

    Attributes: ``image_size`` (square input side), ``mean``/``std`` (RGB normalisation),
    ``context_length``, ``embed_dim`` (pooled size D), ``vision_width`` (patch token width),
    ``text_width`` (text token width), ``num_patches``.
    """

    def __init__(self, cfg: BackboneConfig, *, load_weights: bool = True):
        super().__init__()
        self.clip = _build_clip(cfg, load_weights)
        where = f"backbone '{cfg.arch or 'clip_config'}'"
        visual = self.clip.visual
        if not isinstance(visual, VisionTransformer):
            raise ConfigError(
                f"{where}: the image tower must be an open_clip ViT, got {type(visual).__name__}"
            )
        if visual.image_size[0] != visual.image_size[1]:
            raise ConfigError(f"{where}: only square inputs are supported, got {visual.image_size}")
        text = getattr(self.clip, "text", None)
        if text is not None and not isinstance(text, TextTransformer):
            raise ConfigError(
                f"{where}: the text tower must be an open_clip TextTransformer, got {type(text).__name__}"
            )
        if text is not None:
            text.output_tokens = True
        # open_clip's own temperature is never used: the DetailFusion model owns its logit scale.
        for name in ("logit_scale", "logit_bias"):
            if isinstance(getattr(self.clip, name, None), nn.Parameter):
                delattr(self.clip, name)

        self.image_size: int = visual.image_size[0]
        self.num_patches: int = visual.grid_size[0] * visual.grid_size[1]
        self.vision_width: int = visual.ln_post.normalized_shape[0]
        self.embed_dim: int = visual.output_dim
        text_module = text if text is not None else self.clip
        self.context_length: int = text_module.context_length
        self.text_width: int = text.width if text is not None else self.clip.transformer.width
        vocab_size = text_module.vocab_size
        tokenizer_vocab = get_tokenizer(self.context_length).vocab_size
        if vocab_size < tokenizer_vocab:
            raise ConfigError(
                f"{where}: text vocab_size {vocab_size} < {tokenizer_vocab} of the CLIP BPE tokenizer"
            )
        self.pad_token_id: int = getattr(text_module, "pad_id", PAD_TOKEN_ID)
        self.trims_padding: bool = _padding_is_inert(text, self.clip)

        self.mean: tuple[float, ...] = tuple(
            cfg.mean or getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN
        )
        self.std: tuple[float, ...] = tuple(
            cfg.std or getattr(visual, "image_std", None) or OPENAI_DATASET_STD
        )
        self.register_buffer("pixel_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

    # ---------------------------------------------------------------- inputs
    def tokenize(self, texts: list[str]) -> torch.LongTensor:
        """Captions -> token ids ``[B, context_length]`` (truncated, end-of-text kept)."""
        if isinstance(texts, str):
            raise TypeError("tokenize expects a list of strings, got one string")
        return get_tokenizer(self.context_length)(list(texts)).to(self.pixel_mean.device)

    def preprocess_uint8(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, H, W, 3]`` (or one ``[H, W, 3]``) -> normalised float ``[B, 3, S, S]``.

        Resizes (bilinear, antialiased) when the side is not ``image_size``; the result lies on the
        backbone's device.
        """
        x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        if x.dtype != torch.uint8:
            raise ValueError(f"preprocess_uint8 expects uint8 pixels, got {x.dtype}")
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"preprocess_uint8 expects [B, H, W, 3] pixels, got shape {tuple(x.shape)}")
        x = x.to(self.pixel_mean.device).permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(
                x, size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False
            )
        return (x - self.pixel_mean) / self.pixel_std

    # ---------------------------------------------------------------- encoders
    def encode_image(
        self, images: torch.Tensor, patch_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``[B, 3, S, S]`` -> (pooled ``[B, D]`` unnormalised, patch tokens ``[B, N, W]``).

        ``patch_mask`` (bool ``[B, num_patches]``, True = masked) drops those patches before the
        transformer, so tokens has ``N = num_patches - masked`` rows (open_clip's token output:
        the class token is pooled, not returned).
        """
        visual = self.clip.visual
        x = visual.conv1(images)
        if x.shape[-2:] != tuple(visual.grid_size):
            raise ValueError(
                f"images of side {images.shape[-1]} give a {tuple(x.shape[-2:])} patch grid; "
                f"the backbone expects {self.image_size} px (use preprocess_uint8)"
            )
        x = x.flatten(2).transpose(1, 2)
        pos = visual.positional_embedding.to(x.dtype)
        x = x + pos[1:]
        if patch_mask is not None:
            x = self._drop_patches(x, patch_mask)
        cls = (visual.class_embedding.to(x.dtype) + pos[0]).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = visual.patch_dropout(x)
        x = visual.ln_pre(x)
        x = visual.transformer(x)
        pooled, tokens = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled, tokens

    def _drop_patches(self, x: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        if patch_mask.dtype != torch.bool or patch_mask.shape != x.shape[:2]:
            raise ValueError(
                f"patch_mask must be bool [B, {self.num_patches}] = {tuple(x.shape[:2])}, "
                f"got {patch_mask.dtype} {tuple(patch_mask.shape)}"
            )
        keep = ~patch_mask.to(x.device)
        counts = keep.sum(dim=1)
        if bool((counts != counts[0]).any()) or int(counts[0]) == 0:
            raise ValueError(
                f"patch_mask must keep the same, non-zero number of patches per row, got {counts.tolist()}"
            )
        # nonzero walks rows in order, so the kept indices reshape row by row.
        keep_idx = keep.nonzero()[:, 1].view(x.shape[0], int(counts[0]))
        return torch.gather(x, 1, keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids ``[B, L]`` -> (pooled ``[B, D]``, token features ``[B, L, W_text]``, mask ``[B, L]``).

        The mask is True on real tokens (start, words, end-of-text) and False on the padding after
        them. In training mode, when the text tower's outputs on real tokens cannot depend on
        padding (``trims_padding``: a causal tower pooled at end-of-text or the first token), the
        columns that are padding in every row are cut off first, so ``L`` is the batch's longest
        sequence and the tower does not spend its compute on padding (synthetic captions fill
        about 11 of our 32 positions); the outputs are those of the padded batch up to float
        rounding. In eval mode every caption runs at the full context, so an embedding does not
        depend, even in its last bit, on which captions share its batch (the evaluate stage,
        batch retrieval and stage 3's cache embed in different batches and must agree).
        """
        attention_mask = real_token_mask(tokens, self.pad_token_id)
        if self.trims_padding and self.training:
            length = max(1, int(attention_mask.sum(dim=1).max()))  # each row's mask is a prefix
            tokens, attention_mask = tokens[:, :length], attention_mask[:, :length]
        text = getattr(self.clip, "text", None)
        if text is not None:
            pooled, feats = text(tokens)
            return pooled, feats, attention_mask[:, : feats.shape[1]]
        clip = self.clip
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(
                f"token sequences of length {length} exceed the context length {self.context_length}"
            )
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens).to(cast_dtype)
        x = x + clip.positional_embedding[:length].to(cast_dtype)
        attn_mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
        x = clip.transformer(x, attn_mask=attn_mask)
        feats = clip.ln_final(x)
        pooled = text_global_pool(
            feats, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None)
        )
        if clip.text_projection is not None:
            proj = clip.text_projection
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return pooled, feats, attention_mask

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, num_patches={self.num_patches}, embed_dim={self.embed_dim}"
