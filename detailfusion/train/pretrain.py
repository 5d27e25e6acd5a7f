"""The ``pretrain_backbone`` stage: a CLIP-style pretrained backbone for the embedded default.

The paper (and a real run) starts every variant from one pretrained CLIP-class backbone. No
weights can be downloaded for the embedded default, so this stage makes one: the architecture's
open_clip model (``model.arch``) is trained with the CLIP objective (symmetric InfoNCE with a
learned temperature) on synthetic image-description pairs
(:mod:`detailfusion.data.synthetic.descriptions`), and written as an open_clip-loadable
checkpoint, ``<out>/open_clip.safetensors``. ``model.pretrained`` points at that file, so the
three DetailFusion stages take the same code path as a real run with ``pretrained: openai`` or a
local checkpoint, and DVC computes the backbone once for every variant and seed.

The stage only trains when ``model.pretrained`` names its output file; with any other value (an
open_clip tag, another checkpoint, ``null``) it writes a summary saying it was skipped, so
real-data params skip it without another switch.

Outputs: ``<out>/open_clip.safetensors``, ``<out>/summary.json`` and ``metrics/pretrain_backbone.json``
(held-out image->text and text->image top-1/top-5 among ``heldout`` pairs of each domain).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from detailfusion import timings
from detailfusion.config import to_dict
from detailfusion.errors import ConfigError
from detailfusion.fsutil import write_stage_outputs
from detailfusion.train.config import LoopConfig, PretrainConfig  # noqa: F401 - LoopConfig: re-exported
from detailfusion.train.data import StepSampler
from detailfusion.train.loop import run_training
from detailfusion.train.tasks import param_groups

CHECKPOINT_FILE = "open_clip.safetensors"
METRICS_FILE = "pretrain_backbone.json"
INIT_TEMPERATURE = 0.07


class ClipWithTemperature(nn.Module):
    """The backbone adapter plus CLIP's learned temperature (saved as open_clip's ``logit_scale``)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / INIT_TEMPERATURE)))

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone.encode_image(self.backbone.preprocess_uint8(pixels))[0], dim=-1)

    def embed_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone.encode_text(tokens)[0], dim=-1)

    def open_clip_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in open_clip's own names (``open_clip.load_checkpoint`` reads them strictly)."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.backbone.clip.state_dict().items()}
        state["logit_scale"] = self.logit_scale.detach().cpu().reshape(())
        return state


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of matching image/text rows (CLIP); the scale is capped at 100 as in CLIP."""
    logits = logit_scale.exp().clamp(max=100.0) * image @ text.t()
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.t().float(), labels)) / 2


class ClipPretrainTask(nn.Module):
    """The CLIP objective over rendered images and their descriptions (the loop's task interface)."""

    name = "pretrain_backbone"

    def __init__(self, model: ClipWithTemperature, pixels: np.ndarray, tokens: torch.Tensor, sampler: StepSampler):
        super().__init__()
        self.model = model
        self.pixels = pixels
        self.tokens = tokens
        self.sampler = sampler

    def batch(self, step: int, micro: int, n_micro: int, rank: int, world: int) -> dict:
        rows = np.sort(self.sampler.micro_batch(step, micro, n_micro, rank, world))
        return {"pixels": torch.from_numpy(self.pixels[rows]), "tokens": self.tokens[torch.as_tensor(rows)]}

    def forward(self, batch: dict) -> dict:
        image = self.model.embed_images(batch["pixels"])
        text = self.model.embed_texts(batch["tokens"])
        loss = clip_loss(image, text, self.model.logit_scale)
        return {"loss": loss, "temperature": (1.0 / self.model.logit_scale.exp()).detach()}

    def optimizer_groups(self, lr: float, lr_backbone: float, weight_decay: float) -> list[dict]:
        # Everything trained here is the backbone being made: one learning rate (``lr``).
        return param_groups({"clip": (list(self.model.named_parameters()), lr)}, weight_decay)


@torch.no_grad()
def retrieval_accuracy(model: ClipWithTemperature, pixels: np.ndarray, texts: list[str], batch_size: int = 512) -> dict:
    """Image->text and text->image top-1/top-5 (%) among the given pairs; a hit is the right text.

    Two images may share a description (garments with the same attributes): retrieving any text
    equal to the image's own counts as a hit, and text->image counts any image with that text.
    """
    model.eval()
    images = torch.cat([model.embed_images(pixels[s : s + batch_size]) for s in range(0, len(texts), batch_size)])
    tokens = model.backbone.tokenize(texts)
    text_emb = torch.cat([model.embed_texts(tokens[s : s + batch_size]) for s in range(0, len(texts), batch_size)])
    ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    label = torch.tensor([ids[t] for t in texts])
    sims = images @ text_emb.t()
    out = {}
    for name, s in (("image_to_text", sims), ("text_to_image", sims.t())):
        top = s.topk(min(5, s.shape[1]), dim=1).indices
        hit = label[top] == label.unsqueeze(1)
        out[f"{name}_top1"] = round(100 * hit[:, 0].float().mean().item(), 2)
        out[f"{name}_top5"] = round(100 * hit.any(dim=1).float().mean().item(), 2)
    model.train()
    return out


def _split_heldout(domain: np.ndarray, heldout: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The last ``heldout`` pairs of each domain are held out (generation order is already random)."""
    test = {}
    for d in np.unique(domain).tolist():
        rows = np.flatnonzero(domain == d)
        test[d] = rows[-heldout:]
    held = np.concatenate(list(test.values()))
    train = np.setdiff1d(np.arange(len(domain)), held)
    return train, test


def run_pretrain(params, metrics_dir: str | Path = "metrics", progress: bool = True, on_log=None) -> dict:
    """Train (or skip) the backbone; returns the stage metrics written to ``metrics/pretrain_backbone.json``.

    ``params``: the checked ``params.yaml`` (:class:`detailfusion.params.Params`); the stage reads
    ``pretrain_backbone``, ``model`` and the look of the images (``synthesize.image_size``,
    ``synthesize.render_scale``)."""
    from tqdm.auto import tqdm

    from detailfusion.data.synthetic.descriptions import pretraining_pairs
    from detailfusion.models import get_model_config
    from detailfusion.models.backbone import ClipBackbone

    source = params.source
    cfg: PretrainConfig = params.pretrain_backbone
    model_section = params.model
    out = Path(cfg.out)
    target = out / CHECKPOINT_FILE
    metrics_path = Path(metrics_dir) / METRICS_FILE
    if model_section.pretrained is None or Path(model_section.pretrained) != target:
        reason = (f"model.pretrained is {model_section.pretrained!r}, not this stage's output {str(target)!r}")
        metrics = {"stage": "pretrain_backbone", "skipped": True, "reason": reason, "steps": 0}
        _write(out, None, metrics, metrics_path)
        return metrics

    arch = get_model_config(model_section.arch)
    if arch.backbone.arch is not None:
        raise ConfigError(
            f"{source}: pretrain_backbone trains inline open_clip configs only; model.arch "
            f"'{model_section.arch}' names the open_clip architecture '{arch.backbone.arch}': give it a "
            f"pretrained tag or checkpoint in model.pretrained instead (the stage then skips itself)"
        )
    # only the look of the images (side, anti-aliasing) is shared with the benchmark's generator
    synth = params.synthesize
    arch.backbone.pretrained = None  # this stage makes the weights
    with timings.phase("build_model"):
        torch.manual_seed(cfg.loop.seed)
        model = ClipWithTemperature(ClipBackbone(arch.backbone, load_weights=False))
    with timings.phase("load_data"), tqdm(total=cfg.scenes + cfg.garments, desc="pretrain pairs", unit="img",
                                          disable=not progress) as bar:
        pixels, texts, domain = pretraining_pairs(cfg.seed, cfg.scenes, cfg.garments, synth.image_size,
                                                  synth.render_scale, bar.update)
        train_rows, test_rows = _split_heldout(domain, cfg.heldout)
        tokens = model.backbone.tokenize([texts[i] for i in train_rows])
    truncated = float((tokens[:, -1] != model.backbone.pad_token_id).float().mean())
    sampler = StepSampler(np.full(len(train_rows), -1), cfg.loop.batch_size, cfg.loop.seed)
    task = ClipPretrainTask(model, pixels[train_rows], tokens, sampler)
    run_config = {"pretrain_backbone": to_dict(cfg), "model": asdict(model_section)}
    ckpt_dir = out.with_name(out.name + ".checkpoints")
    with timings.phase("train"):
        summary = run_training(task, cfg.loop, ckpt_dir, run_config=run_config, on_log=on_log, progress=progress)
    summary = timings.split_run_facts(summary)  # wall-clock figures go to the timings, not the hashed output
    domains = {0: "scenes", 1: "garments"}
    with timings.phase("validate"):
        heldout = {domains[d]: retrieval_accuracy(model, pixels[rows], [texts[i] for i in rows])
                   for d, rows in test_rows.items()}
    metrics = {"stage": "pretrain_backbone", "skipped": False, **summary, "train_pairs": int(len(train_rows)),
               "truncated_descriptions": round(100 * truncated, 2),
               "final_temperature": round(1.0 / math.exp(model.logit_scale.item()), 5), "heldout": heldout}
    with timings.phase("write"):
        _write(out, model, metrics, metrics_path)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return metrics


def _write(out: Path, model: ClipWithTemperature | None, metrics: dict, metrics_path: Path) -> None:
    """Swap the whole output folder in atomically (the backbone's weights unless skipped), then the metrics file."""
    from safetensors.torch import save_file

    def write_model(folder: Path) -> None:
        save_file(model.open_clip_state_dict(), str(folder / CHECKPOINT_FILE))

    write_stage_outputs(out, metrics, metrics_path, metrics, write_model if model is not None else None)
