"""Training tasks: a model plus its loss, returning a dict of losses (open_clip/timm style).

One generic loop (``loop.py``) trains any of them. A task also owns its data: ``batch(step,
micro, rank, world)`` builds the CPU tensors of one micro-batch deterministically from the
step number, so checkpoint/resume and DDP sharding need no data-loader state.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from detailfusion.train.data import StepSampler, Triplets, fiq_training_caption, gather_pixels, patch_mask


@runtime_checkable
class LoopTask(Protocol):
    """What the training loop (``loop.run_training`` / ``loop.train_step``) needs from a task.

    A task is an ``nn.Module`` (the loop moves it to the device, puts it in train mode, freezes
    what its groups leave out and wraps it in DDP under torchrun) that also owns its data and its
    optimiser groups. Every task here (``DetailPretrainTask``, ``BranchFinetuneTask``,
    ``FusionTask``) meets it; ``isinstance(task, LoopTask)`` checks that the members exist.
    """

    name: str  # progress bar, log lines, checkpoint metadata
    model: nn.Module  # what a checkpoint saves and restores (``model.state_dict()``)

    def optimizer_groups(self, lr: float, lr_backbone: float, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: ``params``, ``lr``, ``weight_decay`` and a unique ``name`` (the logs'
        ``lr/<name>``); parameters in no group are frozen."""
        ...

    def batch(self, step: int, micro: int, n_micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """CPU tensors of micro-batch ``micro`` (of ``n_micro``) of ``step``, this rank's share; a
        pure function of its arguments (resume and DDP need no loader state). The first tensor's
        leading dimension is the number of samples."""
        ...

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Scalar outputs: ``loss`` (minimised) plus anything to log (``loss_gm``, ``w_di``...)."""
        ...

    # nn.Module members the loop calls
    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def named_parameters(self, *args: Any, **kwargs: Any) -> Any: ...


def info_nce(
    query: torch.Tensor,
    target: torch.Tensor,
    scale: torch.Tensor,
    extra: torch.Tensor | None = None,
    bank: torch.Tensor | None = None,
    bank_mask: torch.Tensor | None = None,
):
    """InfoNCE of normalised queries against in-batch targets (+ per-query extra negatives, +
    negatives shared by every query).

    ``extra`` is ``[B, M, D]``; rows with no real negative are all-zero vectors and are masked out.
    ``bank`` is ``[K, D]`` (stage 2's memory of earlier batches' targets); ``bank_mask`` ``[B, K]``
    is True where an entry is no negative of that query (its own target or reference, an empty
    slot) and is left out of its softmax.
    """
    logits = scale * query @ target.t()
    if extra is not None and extra.shape[1]:
        extra_logits = scale * torch.einsum("bd,bmd->bm", query, extra)
        valid = extra.abs().sum(-1) > 0
        extra_logits = extra_logits.masked_fill(~valid, float("-inf"))
        logits = torch.cat([logits, extra_logits], dim=1)
    if bank is not None and bank.shape[0]:
        bank_logits = scale * query @ bank.to(query.dtype).t()
        if bank_mask is not None:
            bank_logits = bank_logits.masked_fill(bank_mask, float("-inf"))
        logits = torch.cat([logits, bank_logits], dim=1)
    labels = torch.arange(query.shape[0], device=query.device)
    return F.cross_entropy(logits.float(), labels)


class TargetBank:
    """A first-in-first-out memory of the last ``size`` target embeddings of stage 2 (a
    cross-batch memory, as MoCo's queue and XBM keep one), with the gallery index of each.

    Every query of a step scores its target against the bank as extra negatives, so the softmax
    sees ``size`` gallery images instead of the batch's 64 at no encoder cost; the entries are
    detached and up to ``size / batch`` steps old. Entries holding the query's own target are
    masked (the same image is no negative), and so are those holding its reference when
    ``mask_reference`` (CIRR's ranking drops the reference; FashionIQ's keeps it, so there the
    reference stays a negative, as it is at retrieval). Plain tensors, not module buffers: DDP
    would broadcast rank 0's buffers over the others; under DDP each push gathers every rank's
    targets, so the ranks hold the same bank.
    ``state()`` / ``load_state()`` carry it through a checkpoint, so a resumed run is exact.
    """

    def __init__(self, size: int, mask_reference: bool = True):
        if size < 0:
            raise ValueError(f"bank_size: must be >= 0, got {size}")
        self.size = size
        self.mask_reference = mask_reference
        self.emb: torch.Tensor | None = None  # [size, D] float32, allocated by the first push
        self.index = torch.full((size,), -1, dtype=torch.long)  # -1 = empty slot
        self.ptr = 0

    def __len__(self) -> int:
        return int((self.index >= 0).sum())

    def negatives(self, target_index: torch.Tensor, reference_index: torch.Tensor):
        """(bank ``[K, D]`` or None when empty, mask ``[B, K]``: True = not a negative of that query)."""
        if self.emb is None:
            return None, None
        index = self.index.to(target_index.device)
        mask = (index < 0).unsqueeze(0) | (index.unsqueeze(0) == target_index.unsqueeze(1))
        if self.mask_reference:
            mask |= index.unsqueeze(0) == reference_index.unsqueeze(1)
        return self.emb, mask

    def push(self, emb: torch.Tensor, index: torch.Tensor) -> None:
        """Append ``emb`` ``[B, D]`` (their gallery ``index`` ``[B]``), overwriting the oldest."""
        if not self.size:
            return
        emb, index = emb.detach().float(), index.detach().long()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            parts = [torch.empty_like(emb) for _ in range(world)], [torch.empty_like(index) for _ in range(world)]
            torch.distributed.all_gather(parts[0], emb)
            torch.distributed.all_gather(parts[1], index)
            emb, index = torch.cat(parts[0]), torch.cat(parts[1])
        emb, index = emb[-self.size :], index[-self.size :]
        if self.emb is None:
            self.emb = emb.new_zeros(self.size, emb.shape[1])
        self.index = self.index.to(index.device)
        slots = (self.ptr + torch.arange(emb.shape[0], device=index.device)) % self.size
        # out of place: this step's losses hold the old table for their backward pass
        self.emb = self.emb.index_copy(0, slots, emb)
        self.index = self.index.index_copy(0, slots, index)
        self.ptr = (self.ptr + emb.shape[0]) % self.size

    def state(self) -> dict:
        return {"emb": None if self.emb is None else self.emb.cpu(), "index": self.index.cpu(), "ptr": self.ptr}

    def load_state(self, state: dict, device: torch.device | str = "cpu") -> None:
        if state["index"].shape[0] != self.size:
            raise ValueError(f"checkpoint holds a target bank of {state['index'].shape[0]} entries, bank_size is {self.size}")
        self.emb = None if state["emb"] is None else state["emb"].to(device)
        self.index = state["index"].to(device)
        self.ptr = int(state["ptr"])


# Learned tokens and embedding tables by name: open_clip's class/positional/token embeddings,
# the Q-Former's query tokens and embeddings, the compositor's CLS token and segment embedding.
_NO_DECAY_NAMES = ("embedding", "query_tokens", "cls_token", "segment", "logit_scale")


def no_weight_decay(name: str, p: nn.Parameter) -> bool:
    """AdamW's usual exemptions: norms and biases (1-D), embeddings, learned tokens, scales."""
    leaf = name.rsplit(".", 1)[-1]
    return p.ndim < 2 or leaf == "bias" or any(key in name for key in _NO_DECAY_NAMES)


def param_groups(modules: dict[str, tuple[list[tuple[str, nn.Parameter]], float]], weight_decay: float) -> list[dict]:
    """AdamW groups: per-module learning rates; no decay on norms, biases, embeddings, tokens.

    ``modules`` maps a group name to (named parameters, lr); each group records its parameters'
    names under ``param_names`` so the rules can be checked and logged by name. A module at
    learning rate 0 gets no group, so the loop freezes it: no backward through it, and its
    gradients stay out of the clipping norm (a group at lr 0 kept the weights but not those).
    """
    groups = []
    for group, (named, lr) in modules.items():
        if lr == 0:
            continue
        named = [(n, p) for n, p in named if p.requires_grad]
        for suffix, members, wd in (
            ("", [(n, p) for n, p in named if not no_weight_decay(n, p)], weight_decay),
            (".no_decay", [(n, p) for n, p in named if no_weight_decay(n, p)], 0.0),
        ):
            if members:
                groups.append({"params": [p for _, p in members], "param_names": [n for n, _ in members],
                               "lr": lr, "weight_decay": wd, "name": group + suffix})  # fmt: skip
    return groups


class TrainingTask(nn.Module):
    """Base: holds the model, the triplets and the sampler; subclasses define the loss."""

    name = "task"

    def __init__(self, model: nn.Module, triplets: Triplets, pixels: np.ndarray, sampler: StepSampler, seed: int):
        super().__init__()
        self.model = model
        self.triplets = triplets
        self.pixels = pixels
        self.sampler = sampler
        self.seed = seed
        self._tokens = None

    def tokens(self, rows: np.ndarray) -> torch.Tensor:
        if self._tokens is None:
            self._tokens = self.model.tokenize(self.triplets.texts)
        return self._tokens[torch.as_tensor(rows)]

    def images(self, index: np.ndarray) -> torch.Tensor:
        return gather_pixels(self.pixels, index)

    def optimizer_groups(self, lr: float, lr_backbone: float, weight_decay: float) -> list[dict]:
        raise NotImplementedError


class DetailPretrainTask(TrainingTask):
    """Stage 1: DI on atomic edits. Detail-oriented objective = synchronised patch masking of
    reference and target (shared context removed, the edit must carry the match) + other edits
    of the same original in the batch as hard negatives (grouping is done by the sampler)."""

    name = "stage1_detail"

    def __init__(self, *args, mask_ratio: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_ratio = mask_ratio

    def batch(self, step: int, micro: int, n_micro: int, rank: int, world: int) -> dict:
        rows = self.sampler.micro_batch(step, micro, n_micro, rank, world)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 97 + micro * 7 + rank)
        n_patches = self.model.num_patches
        mask = patch_mask(len(rows), n_patches, self.mask_ratio, gen)
        out = {
            "ref": self.images(self.triplets.ref[rows]),
            "target": self.images(self.triplets.target[rows]),
            "tokens": self.tokens(rows),
        }
        if mask is not None:
            out["patch_mask"] = mask
        return out

    def forward(self, batch: dict) -> dict:
        m = self.model
        mask = batch.get("patch_mask")
        ref = m.preprocess_uint8(batch["ref"])
        tgt = m.preprocess_uint8(batch["target"])
        branches = m.branch_outputs(ref, batch["tokens"], patch_mask=mask)
        t = m.encode_target(tgt, patch_mask=mask)
        loss = info_nce(branches["di"], t, m.logit_scale)
        return {"loss": loss, "loss_di": loss.detach()}

    def optimizer_groups(self, lr, lr_backbone, weight_decay):
        g = self.model.parameter_groups()
        return param_groups(
            {"backbone": (g["backbone"], lr_backbone), "di": (g["di"], lr), "other": (g["other"], lr)}, weight_decay
        )


class BranchFinetuneTask(TrainingTask):
    """Stage 2: GM and DI on the target data set, each with its own InfoNCE, plus an optional
    InfoNCE on their 0.5/0.5 fusion; CIRR set members are extra (hard) negatives for DI. With
    ``bank_size`` > 0 the last ``bank_size`` targets (:class:`TargetBank`) are negatives of all
    three losses (a query's reference among them only when ``exclude_reference`` is False, as
    in FashionIQ's ranking)."""

    name = "stage2_branches"

    def __init__(self, *args, hard_negatives: int = 2, fused_loss_weight: float = 1.0, fiq_random_captions=False,
                 bank_size: int = 0, exclude_reference: bool = True, **kw):
        super().__init__(*args, **kw)
        self.hard_negatives = hard_negatives
        self.fused_loss_weight = fused_loss_weight
        self.fiq_random_captions = fiq_random_captions
        self.bank = TargetBank(bank_size, mask_reference=exclude_reference)

    def loop_state(self) -> dict:
        """What the loop checkpoints beside model and optimiser: the target bank."""
        return {"bank": self.bank.state()}

    def load_loop_state(self, state: dict) -> None:
        self.bank.load_state(state["bank"], device=self.model.logit_scale_log.device)

    def batch(self, step: int, micro: int, n_micro: int, rank: int, world: int) -> dict:
        rows = self.sampler.micro_batch(step, micro, n_micro, rank, world)
        rng = np.random.default_rng([self.seed, step, micro, rank])
        if self.fiq_random_captions:
            texts = [
                fiq_training_caption(*(self.triplets.captions[i] + ["", ""])[:2], rng.random()) for i in rows
            ]
            tokens = self.model.tokenize(texts)
        else:
            tokens = self.tokens(rows)
        out = {
            "ref": self.images(self.triplets.ref[rows]),
            "target": self.images(self.triplets.target[rows]),
            "tokens": tokens,
        }
        if self.bank.size:
            out["target_index"] = torch.as_tensor(self.triplets.target[rows], dtype=torch.long)
            out["reference_index"] = torch.as_tensor(self.triplets.ref[rows], dtype=torch.long)
        if self.hard_negatives and self.model.di is not None:
            negs = self.triplets.negatives[rows]
            pick = np.argsort(rng.random(negs.shape), axis=1)[:, : self.hard_negatives]
            chosen = np.take_along_axis(negs, pick, axis=1)
            if (chosen >= 0).any():
                out["negatives"] = self.images(np.where(chosen >= 0, chosen, 0).reshape(-1))
                out["negatives_valid"] = torch.from_numpy(chosen >= 0)
        return out

    def forward(self, batch: dict) -> dict:
        m = self.model
        ref = m.preprocess_uint8(batch["ref"])
        tgt = m.preprocess_uint8(batch["target"])
        b = m.branch_outputs(ref, batch["tokens"])
        t = m.encode_target(tgt)
        scale = m.logit_scale
        parts = {}
        loss = t.new_zeros(())
        extra = None
        if "negatives" in batch:
            with torch.no_grad():
                n = m.encode_target(m.preprocess_uint8(batch["negatives"]))
            n = n.view(t.shape[0], -1, t.shape[1]) * batch["negatives_valid"].unsqueeze(-1).to(n.dtype)
            extra = n
        bank, bank_mask = None, None
        if "target_index" in batch:
            bank, bank_mask = self.bank.negatives(batch["target_index"], batch["reference_index"])
        if b.get("gm") is not None:
            parts["loss_gm"] = info_nce(b["gm"], t, scale, bank=bank, bank_mask=bank_mask)
            loss = loss + parts["loss_gm"]
        if b.get("di") is not None:
            parts["loss_di"] = info_nce(b["di"], t, scale, extra, bank, bank_mask)
            loss = loss + parts["loss_di"]
        if b.get("gm") is not None and b.get("di") is not None and self.fused_loss_weight > 0:
            fused = F.normalize(b["gm"] + b["di"], dim=-1)
            parts["loss_fused"] = info_nce(fused, t, scale, extra, bank, bank_mask)
            loss = loss + self.fused_loss_weight * parts["loss_fused"]
        if "target_index" in batch:  # after the losses: this batch's targets are already its negatives
            self.bank.push(t, batch["target_index"])
        return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}

    def optimizer_groups(self, lr, lr_backbone, weight_decay):
        g = self.model.parameter_groups()
        return param_groups(
            {
                "backbone": (g["backbone"], lr_backbone),
                "gm": (g["gm"], lr),
                "di": (g["di"], lr),
                "other": (g["other"], lr),
            },
            weight_decay,
        )


class FusionTask(nn.Module):
    """Stage 3: the AFC on cached, frozen branch outputs (a fraction of stage 2's cost).

    Two objectives. When the cache holds a ``gallery`` table (``cache_branch_outputs(...,
    gallery=True)``), each fused query is scored against every image in it, a full softmax
    over the training gallery with its ``target_index`` as the label (and its reference
    masked out when ``exclude_reference``, as CIRR's ranking removes it): the same task as
    retrieval, which ranks a whole gallery. Without it, InfoNCE against the batch's targets
    plus ``hard_negatives`` set members per query.
    """

    name = "stage3_fusion"

    def __init__(self, model: nn.Module, cache: dict[str, torch.Tensor], sampler: StepSampler, seed: int,
                 hard_negatives: int = 4, exclude_reference: bool = True):
        super().__init__()
        self.model = model
        cache = dict(cache)
        # a buffer, so the loop's task.to(device) moves it; not part of any checkpoint
        self.register_buffer("gallery", cache.pop("gallery", None), persistent=False)
        self.cache = cache
        self.sampler = sampler
        self.seed = seed
        self.hard_negatives = hard_negatives
        self.exclude_reference = exclude_reference

    def batch(self, step: int, micro: int, n_micro: int, rank: int, world: int) -> dict:
        idx = torch.as_tensor(self.sampler.micro_batch(step, micro, n_micro, rank, world))
        out = {k: v[idx] for k, v in self.cache.items() if k != "negatives"}
        if self.gallery is None and self.hard_negatives and "negatives" in self.cache:
            out["negatives"] = self.cache["negatives"][idx][:, : self.hard_negatives]
        return out

    def forward(self, batch: dict) -> dict:
        branch = {k: batch[k] for k in ("gm", "di", "gm_tokens", "di_tokens")}
        fused = self.model.fuse(branch)
        scale = self.model.logit_scale.detach()
        if self.gallery is not None:
            logits = scale * fused["query"] @ self.gallery.t()
            if self.exclude_reference:  # (never the label: a query whose target is its reference keeps it)
                ref, tgt = batch["reference_index"], batch["target_index"]
                drop = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, ref.unsqueeze(1), True)
                logits = logits.masked_fill(drop & (ref != tgt).unsqueeze(1), float("-inf"))
            loss = F.cross_entropy(logits.float(), batch["target_index"])
        else:
            loss = info_nce(fused["query"], batch["target"], scale, batch.get("negatives"))
        w = fused.get("weights")
        parts = {"loss_fused": loss.detach()}
        if w is not None:
            parts["w_di"] = w[:, 1].mean().detach()
        return {"loss": loss, **parts}

    def optimizer_groups(self, lr, lr_backbone, weight_decay):
        g = self.model.parameter_groups()
        return param_groups({"afc": (g["afc"], lr)}, weight_decay)
