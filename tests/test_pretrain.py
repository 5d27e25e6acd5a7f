"""The pretrain_backbone stage: pairs, the CLIP objective, an open_clip-loadable checkpoint, skipping."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import REPO_ROOT

from detailfusion.data.synthetic.descriptions import describe_garment, pretraining_pairs
from detailfusion.data.synthetic.garments import random_garment
from detailfusion.data.synthetic.rng import Stream
from detailfusion.data.synthetic.scenes import random_scene
from detailfusion.errors import ConfigError
from detailfusion.params import params_from_mapping
from detailfusion.train.pretrain import CHECKPOINT_FILE, METRICS_FILE, clip_loss
from detailfusion.train.pretrain import run_pretrain as stage_run_pretrain


def _params(tmp_path, **pretrain):
    """The real params.yaml with a tiny pretrain_backbone section writing under ``tmp_path``."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    out = tmp_path / "backbone"
    section = params["pretrain_backbone"]
    section.update(out=str(out), scenes=120, garments=60, heldout=20)
    section["loop"].update(max_steps=3, batch_size=16, warmup_steps=1, checkpoint_every=2, log_every=1)
    section["loop"].update(pretrain.pop("loop", {}))
    section.update(pretrain)
    params["synthesize"].update(image_size=64, render_scale=2)
    params["model"].update(arch="tiny", variant="full", pretrained=str(out / CHECKPOINT_FILE))
    return params


def run_pretrain(params: dict, metrics_dir, progress: bool = False):
    """The stage on a params mapping, checked as the CLI checks params.yaml."""
    return stage_run_pretrain(params_from_mapping(params), metrics_dir, progress=progress)


def test_pairs_are_deterministic_and_describe_what_is_drawn():
    a_px, a_txt, a_dom = pretraining_pairs(3, 20, 10, 32, 1)
    b_px, b_txt, _ = pretraining_pairs(3, 20, 10, 32, 1)
    assert a_px.dtype.name == "uint8" and a_px.shape == (30, 32, 32, 3)
    assert (a_px == b_px).all() and a_txt == b_txt
    assert a_dom.tolist() == [0] * 20 + [1] * 10
    c_px, c_txt, _ = pretraining_pairs(4, 20, 10, 32, 1)
    assert c_txt != a_txt
    # the scene stream is the pretraining one: same scenes as random_scene on that stream
    scene = random_scene(Stream(3, "pretrain/scenes"))
    first = a_txt[0]
    assert first.startswith(f"{scene.background} background")
    for o in scene.objects:
        assert f"{o.colour} {o.shape}" in first
    g = random_garment(Stream(0, "x"), "dress")
    text = describe_garment(g)
    assert "dress" in text and g.colour in text and g.neckline in text


def test_clip_loss_is_symmetric_infonce():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(2.0)
    logits = scale.exp() * img @ txt.t()
    expected = 0.0
    for i in range(6):  # brute force, row by row
        expected += -torch.log_softmax(logits[i], 0)[i] / 12 - torch.log_softmax(logits[:, i], 0)[i] / 12
    assert torch.allclose(clip_loss(img, txt, scale), expected, atol=1e-6)
    assert clip_loss(img, img, torch.tensor(4.6)) < clip_loss(img, txt, torch.tensor(4.6))


def test_stage_writes_an_open_clip_checkpoint_the_model_loads(tmp_path):
    from detailfusion.models import create_model, get_model_config

    params = _params(tmp_path)
    metrics = run_pretrain(params, tmp_path / "metrics", progress=False)
    assert metrics["skipped"] is False and metrics["steps"] == 3 and metrics["train_pairs"] == 140
    assert set(metrics["heldout"]) == {"scenes", "garments"}
    assert 0 <= metrics["heldout"]["scenes"]["image_to_text_top1"] <= 100
    assert "seconds" not in metrics and "samples_per_s" not in metrics  # timings stay out of outputs
    assert json.loads((tmp_path / "metrics" / METRICS_FILE).read_text()) == metrics
    ckpt = tmp_path / "backbone" / CHECKPOINT_FILE
    assert ckpt.is_file() and not (tmp_path / "backbone.checkpoints").exists()

    from safetensors.torch import load_file

    saved = load_file(str(ckpt))
    cfg = get_model_config("tiny")
    cfg.backbone.pretrained = str(ckpt)
    model = create_model(cfg, variant="full")  # strict open_clip load of every tensor
    got = model.backbone.clip.state_dict()
    for name, tensor in got.items():
        assert torch.equal(tensor, saved[name]), name
    assert "logit_scale" in saved

    again = run_pretrain(params, tmp_path / "metrics2", progress=False)
    from safetensors.torch import load_file as load2

    assert all(torch.equal(v, load2(str(ckpt))[k]) for k, v in saved.items())  # same seed, same weights
    assert again["heldout"] == metrics["heldout"]


def test_stage_skips_itself_for_other_backbones(tmp_path):
    params = _params(tmp_path)
    params["model"]["pretrained"] = None
    out = run_pretrain(params, tmp_path / "metrics", progress=False)
    assert out["skipped"] is True and "not this stage's output" in out["reason"]
    assert not (tmp_path / "backbone" / CHECKPOINT_FILE).exists()
    assert json.loads((tmp_path / "backbone" / "summary.json").read_text())["skipped"] is True


@pytest.mark.parametrize(("change", "message"), [
    ({"heldout": 200}, r"scenes \(120\) must exceed heldout"),
    ({"scenes": 0, "garments": 0}, "scenes \\+ garments must be > 0"),
    ({"loop": {"max_steps": 3, "lr": -1.0}}, r"pretrain_backbone\.loop\.lr: must be > 0"),
])
def test_bad_params_fail_before_any_work(tmp_path, change, message):
    params = _params(tmp_path, **change)
    with pytest.raises(ConfigError, match=message):
        run_pretrain(params, tmp_path / "metrics", progress=False)
    assert not (tmp_path / "backbone").exists()


def test_arch_models_must_name_their_pretrained_weights(tmp_path):
    params = _params(tmp_path)
    params["model"]["arch"] = "vit-b-32"  # an open_clip architecture name: real weights come from a tag
    with pytest.raises(ConfigError, match="pretrain_backbone trains inline open_clip configs only"):
        run_pretrain(params, tmp_path / "metrics", progress=False)
