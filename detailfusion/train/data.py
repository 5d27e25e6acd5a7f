"""Training data: composed triplets from prepared manifests, and a step-addressable sampler.

Images come from the decoded uint8 cache written by ``prepare`` (``pixels.npy``), so training
never decodes a PNG. Batches are a pure function of ``(seed, step)``: resuming from a checkpoint
at step ``s`` replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from detailfusion.data.pixels import gather_pixels  # noqa: F401 - re-exported for the training tasks
from detailfusion.errors import DataFormatError

log = logging.getLogger(__name__)


@dataclass
class Triplets:
    """Columnar training triplets; indices point into the prepared ``pixels`` array."""

    query_ids: list[str]
    ref: np.ndarray  # int64 [N]
    target: np.ndarray  # int64 [N]
    captions: list[list[str]]  # raw captions per query (FIQ: two; others: one)
    texts: list[str]  # the canonical text (CIRR caption, FIQ validation join, IPr2Pr edit prompt)
    group: np.ndarray  # int64 [N] hard-negative group (IPr2Pr original, CIRR set); -1 = none
    negatives: np.ndarray  # int64 [N, 4] other set members (CIRR); -1 = none
    dataset: str
    dropped: int = 0  # queries whose reference or target image is quarantined

    def __len__(self) -> int:
        return len(self.query_ids)

    def subset(self, rows: np.ndarray) -> Triplets:
        return Triplets(
            query_ids=[self.query_ids[i] for i in rows],
            ref=self.ref[rows],
            target=self.target[rows],
            captions=[self.captions[i] for i in rows],
            texts=[self.texts[i] for i in rows],
            group=self.group[rows],
            negatives=self.negatives[rows],
            dataset=self.dataset,
            dropped=self.dropped,
        )


def build_triplets(prepared, split: str) -> Triplets:
    """Turn the prepared ``queries`` of one split into training triplets.

    Queries whose reference or target image is quarantined are dropped (and counted):
    ``validate`` already refused data sets with more quarantined images than allowed.
    """
    queries = prepared.queries
    queries = queries[queries["split"] == split]
    if queries.empty:
        raise DataFormatError(prepared.path, f"no queries in split '{split}'")
    if queries["target"].isna().any():
        raise DataFormatError(prepared.path, f"split '{split}' has queries without targets; cannot train on it")
    lookup = _pixel_lookup(prepared.images, split)
    n_members = 4
    ref, tgt, negs, keep = [], [], [], []
    group_ids: dict[str, int] = {}
    groups = []
    for i, row in enumerate(queries.itertuples(index=False)):
        key = (row.category or "", row.reference)
        tkey = (row.category or "", row.target)
        r, t = lookup.get(key, -1), lookup.get(tkey, -1)
        if r < 0 or t < 0:
            continue
        members = [m for m in (row.members or []) if m not in (row.reference, row.target)]
        n = [lookup.get(("", m), -1) for m in members][:n_members]
        negs.append(n + [-1] * (n_members - len(n)))
        ref.append(r)
        tgt.append(t)
        keep.append(i)
        g = row.group or ""
        groups.append(group_ids.setdefault(g, len(group_ids)) if g else -1)
    kept = queries.iloc[keep]
    dropped = len(queries) - len(kept)
    if dropped:
        log.warning("%s/%s: %d queries dropped (quarantined images)", prepared.path, split, dropped)
    if kept.empty:
        raise DataFormatError(prepared.path, f"split '{split}': no query has both images decodable")
    return Triplets(
        query_ids=kept["query_id"].tolist(),
        ref=np.asarray(ref, dtype=np.int64),
        target=np.asarray(tgt, dtype=np.int64),
        captions=[list(c) for c in kept["captions"]],
        texts=kept["caption"].tolist(),
        group=np.asarray(groups, dtype=np.int64),
        negatives=np.asarray(negs, dtype=np.int64).reshape(len(kept), n_members),
        dataset=str(kept["dataset"].iloc[0]),
        dropped=dropped,
    )


def _pixel_lookup(images, split: str) -> dict[tuple[str, str], int]:
    rows = images[(images["split"] == split) & (images["pixel_index"] >= 0)]
    triples = zip(rows["category"], rows["image_id"], rows["pixel_index"], strict=True)
    lookup = {(c or "", i): int(p) for c, i, p in triples}
    # CIRR/IPr2Pr members carry no category; FIQ references carry theirs.
    for (_, i), p in list(lookup.items()):
        lookup.setdefault(("", i), p)
    return lookup


def fiq_training_caption(c1: str, c2: str, r: float) -> str:
    """CLIP4Cir's randomised FashionIQ caption at training: 4 joins, p = 0.25 each."""
    a, b = c1.strip(".?, "), c2.strip(".?, ")
    if r < 0.25:
        return f"{a.capitalize()} and {b}"
    if r < 0.5:
        return f"{b.capitalize()} and {a}"
    if r < 0.75:
        return a.capitalize()
    return b.capitalize()


class StepSampler:
    """Batch row indices as a pure function of ``step`` (deterministic, resumable).

    Each epoch is a seeded permutation; with ``grouped`` the rows of one group (same IPr2Pr
    original, for instance) are kept next to each other so they share a batch as hard negatives.
    """

    def __init__(self, groups: np.ndarray, batch_size: int, seed: int, grouped: bool = False):
        self.n = len(groups)
        if self.n < batch_size:
            raise ValueError(f"{self.n} training rows is fewer than one batch of {batch_size}")
        self.groups = groups
        self.batch_size = batch_size
        self.seed = seed
        self.grouped = grouped and bool((groups >= 0).any())
        self.per_epoch = self.n // batch_size
        self._epoch = -1
        self._order = np.arange(self.n)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            if self.grouped:
                perm = rng.permutation(self.n)
                keys = np.where(self.groups >= 0, self.groups, -1 - np.arange(self.n))
                group_rank = {g: k for k, g in enumerate(dict.fromkeys(keys[perm].tolist()))}
                ranks = np.array([group_rank[g] for g in keys.tolist()])
                self._order = perm[np.argsort(ranks[perm], kind="stable")]
            else:
                self._order = rng.permutation(self.n)
            self._epoch = epoch
        return self._order

    def batch(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.per_epoch)
        order = self._epoch_order(epoch)
        return order[k * self.batch_size : (k + 1) * self.batch_size]

    def micro_batch(self, step: int, micro: int, n_micro: int, rank: int, world: int) -> np.ndarray:
        """This rank's share of micro-batch ``micro`` of the global batch of ``step``."""
        rows = self.batch(step)
        per = len(rows) // (n_micro * world)
        start = (micro * world + rank) * per
        return rows[start : start + per]


def patch_mask(batch: int, n_patches: int, ratio: float, generator: torch.Generator) -> torch.Tensor | None:
    """Random patch mask [B, N] (True = masked), the same count per row so tokens can be dropped."""
    n_mask = int(round(n_patches * ratio))
    if n_mask <= 0:
        return None
    noise = torch.rand(batch, n_patches, generator=generator)
    ids = noise.argsort(dim=1)[:, :n_mask]
    mask = torch.zeros(batch, n_patches, dtype=torch.bool)
    mask.scatter_(1, ids, True)
    return mask
