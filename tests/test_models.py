"""Tests of the DetailFusion model package on the tiny CPU config: every variant end to end,
masking, fusion, checkpoint round trips, config loading and the offline tokenizer."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from detailfusion.errors import ConfigError
from detailfusion.models import (
    VARIANTS,
    ModelConfig,
    ModelVariant,
    create_model,
    get_model_config,
    get_variant,
    list_models,
    list_variants,
    load_pretrained,
    load_weights,
    save_pretrained,
)
from detailfusion.models.config import CONFIG_DIR

BATCH = 4
CAPTIONS = [
    "make the small red circle blue",
    "turn the large cyan cross into a square and add a small green triangle at the top left",
    "remove the yellow square",
    "change the background to gray",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny batches gain nothing from a second thread, and OpenMP spinning makes a busy 2-core
    # machine (other test runs) many times slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_config() -> ModelConfig:
    return get_model_config("tiny")


@pytest.fixture(scope="module")
def pixels() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "ref": rng.integers(0, 256, size=(BATCH, 64, 64, 3), dtype=np.uint8),
        "target": rng.integers(0, 256, size=(BATCH, 64, 64, 3), dtype=np.uint8),
    }


def build(config: ModelConfig | str = "tiny", variant: str = "full", seed: int = 0):
    torch.manual_seed(seed)
    return create_model(config, variant)


def inputs(model, pixels):
    return (
        model.preprocess_uint8(pixels["ref"]),
        model.tokenize(CAPTIONS),
        model.preprocess_uint8(pixels["target"]),
    )


def is_unit(x: torch.Tensor) -> bool:
    return torch.allclose(x.norm(dim=-1), torch.ones(x.shape[0]), atol=1e-5)


def has_grad(named: list[tuple[str, torch.nn.Parameter]]) -> bool:
    return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for _, p in named)


# ---------------------------------------------------------------------------- every variant


@pytest.mark.parametrize("variant", list_variants())
def test_variant_forward_backward_and_fuse(variant, pixels):
    model = build(variant=variant).eval()
    spec = get_variant(variant)
    ref, tokens, target = inputs(model, pixels)
    with torch.no_grad():
        # fuse() on cached (cloned) branch outputs is what stage 3 does; it must match encode_query.
        reference = model.encode_query(ref, tokens)
        cached = {
            k: v.clone() if v is not None else None for k, v in model.branch_outputs(ref, tokens).items()
        }
        fused = model.fuse(cached)
    assert torch.allclose(fused["query"], reference["query"], atol=1e-6)
    assert (fused["weights"] is None) == (reference["weights"] is None)

    model.train()
    out = model.encode_query(ref, tokens)
    t = model.encode_target(target)
    dim = model.embed_dim

    assert out["query"].shape == (BATCH, dim) and t.shape == (BATCH, dim)
    assert is_unit(out["query"]) and is_unit(t)
    for branch, n_tokens in (("gm", 3), ("di", model.config.di.num_queries)):
        if branch in spec.branches:
            assert out[branch].shape == (BATCH, dim) and is_unit(out[branch])
            assert out[f"{branch}_tokens"].shape[:2] == (BATCH, n_tokens)
        else:
            assert out[branch] is None and out[f"{branch}_tokens"] is None
            assert getattr(model, branch) is None
            assert not any(k.startswith(f"{branch}.") for k in model.state_dict())
    if spec.fusion in ("gm", "di"):
        assert out["weights"] is None
        assert torch.equal(out["query"], out[spec.fusion])
    else:
        assert out["weights"].shape == (BATCH, 2)
        assert torch.allclose(out["weights"].sum(dim=1), torch.ones(BATCH))
        # avg is fixed; the AFC's zero-initialised head also starts exactly at the average.
        assert torch.equal(out["weights"], torch.full((BATCH, 2), 0.5))
        expected = F.normalize(out["gm"] + out["di"], dim=-1)
        assert torch.allclose(out["query"], expected, atol=1e-6)

    labels = torch.arange(BATCH)
    loss = F.cross_entropy(model.similarity(out["query"], t), labels)
    for branch in spec.branches:
        loss = loss + F.cross_entropy(model.similarity(out[branch], t), labels)
    loss.backward()
    groups = model.parameter_groups()
    assert set(groups) == {"backbone", "gm", "di", "afc", "other"}
    grouped = {id(p) for named in groups.values() for _, p in named}
    assert grouped == {id(p) for p in model.parameters()}, "every parameter is in exactly one group"
    assert has_grad(groups["backbone"]) and has_grad(groups["other"])
    for branch in ("gm", "di"):
        assert has_grad(groups[branch]) == (branch in spec.branches)
        assert bool(groups[branch]) == (branch in spec.branches)
    assert bool(groups["afc"]) == (spec.fusion == "afc") == has_grad(groups["afc"])


def test_variant_registry():
    assert list_variants()[0] == "full"
    assert set(list_variants()) == {
        "full",
        "no_pretrain",
        "gm_only",
        "di_only",
        "avg_fusion",
        "no_detail_opt",
    }
    assert VARIANTS["full"].stages == (1, 2, 3)
    assert VARIANTS["no_pretrain"].stages == (2, 3) and VARIANTS["no_pretrain"].branches == ("gm", "di")
    assert VARIANTS["gm_only"].stages == (2,) and VARIANTS["avg_fusion"].stages == (1, 2)
    assert VARIANTS["no_detail_opt"].stage1 and not VARIANTS["no_detail_opt"].detail_opt
    with pytest.raises(ValueError, match="needs both branches"):
        ModelVariant("bad", ("gm",), "afc", False, False, "")
    with pytest.raises(dataclasses.FrozenInstanceError):
        VARIANTS["full"].fusion = "avg"


# ---------------------------------------------------------------------------- compositor


def test_per_dim_gates_and_afc_learns_away_from_average(tiny_config, pixels):
    cfg = dataclasses.replace(tiny_config, afc=dataclasses.replace(tiny_config.afc, gate="per_dim"))
    model = build(cfg).eval()
    ref, tokens, target = inputs(model, pixels)
    with torch.no_grad():
        cached = model.branch_outputs(ref, tokens)
        t = model.encode_target(target)
    out = model.fuse(cached)
    assert out["gates"].shape == (BATCH, 2, model.embed_dim)
    assert torch.allclose(out["gates"].sum(dim=1), torch.ones(BATCH, model.embed_dim))
    assert torch.allclose(out["weights"], torch.full((BATCH, 2), 0.5))

    # Stage 3 in miniature: only the AFC trains, on cached branch outputs.
    opt = torch.optim.Adam(model.parameter_groups()["afc"], lr=1e-2)
    for _ in range(3):
        loss = F.cross_entropy(model.similarity(model.fuse(cached)["query"], t), torch.arange(BATCH))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.allclose(model.fuse(cached)["weights"], torch.full((BATCH, 2), 0.5), atol=1e-3)


def test_logit_scale_starts_at_inverse_temperature_and_is_clamped():
    model = build(variant="gm_only")
    assert model.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale_log.fill_(math.log(1000.0))
    assert model.logit_scale.item() == pytest.approx(100.0)


# ---------------------------------------------------------------------------- backbone


def test_backbone_matches_open_clip_forward(pixels):
    model = build(variant="gm_only").eval()
    ref, tokens, _ = inputs(model, pixels)
    clip = model.backbone.clip
    with torch.no_grad():
        pooled, patches = model.backbone.encode_image(ref)
        text_pooled, text_feats, text_mask = model.backbone.encode_text(tokens)
        assert torch.allclose(pooled, clip.visual(ref)[0], atol=1e-5)
        assert torch.allclose(text_pooled, clip.encode_text(tokens), atol=1e-5)
    assert patches.shape == (BATCH, model.num_patches, model.backbone.vision_width)
    assert text_feats.shape == (BATCH, 32, model.backbone.text_width)  # eval mode: the full context
    assert torch.equal(text_mask, tokens != 0)


def test_text_padding_trim_changes_nothing_but_the_length(pixels):
    """In training mode a causal text tower pooled at end-of-text runs on the batch's longest
    caption only; its pooled vectors, real-token features and every branch's query equal the
    padded batch's. In eval mode it runs at the full context, whatever the batch."""
    model = build().eval()
    ref, tokens, _ = inputs(model, pixels)
    assert model.backbone.trims_padding
    longest = int((tokens != 0).sum(dim=1).max())  # the batch's longest caption, end-of-text included
    with torch.no_grad():
        padded = model.backbone.encode_text(tokens)
        padded_query = model.encode_query(ref, tokens)
        model.backbone.train()  # the open_clip towers have no dropout: train mode is deterministic
        try:
            trimmed = model.backbone.encode_text(tokens)
            query = model.encode_query(ref, tokens)
        finally:
            model.backbone.eval()
    length = trimmed[1].shape[1]
    assert length == longest
    assert padded[1].shape[1] == 32 and length < 32
    assert torch.allclose(trimmed[0], padded[0], atol=1e-5)
    assert torch.allclose(trimmed[1], padded[1][:, :length], atol=1e-5)
    assert torch.equal(trimmed[2], padded[2][:, :length]) and not padded[2][:, length:].any()
    for key in ("gm", "di", "query"):
        assert torch.allclose(query[key], padded_query[key], atol=1e-5), key


def test_towers_that_see_padding_are_not_trimmed():
    """Without a causal mask (or pooled at the last position) real tokens attend to padding, so
    the text runs at full length."""
    for extra in ({"no_causal_mask": True}, {"pool_type": "last"}):
        config = get_model_config("tiny")
        clip_config = json.loads(json.dumps(config.backbone.clip_config))
        clip_config["text_cfg"].update(extra)
        config = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, clip_config=clip_config))
        model = build(config, variant="gm_only").train()
        assert not model.backbone.trims_padding, extra
        with torch.no_grad():
            _, feats, _ = model.backbone.encode_text(model.tokenize(CAPTIONS))
        assert feats.shape[1] == 32, extra


def test_real_token_mask_keeps_token_zero_inside_a_caption():
    from detailfusion.models.backbone import real_token_mask

    model = build(variant="gm_only")
    tokens = model.tokenize(["wow!; a red cube", "x"])
    assert int((tokens[0] == 0).sum()) > 22, "padding"
    inside = int((tokens[0, : int(tokens[0].argmax())] == 0).sum())
    assert inside == 1, "the BPE spells the ! of !; with id 0, the padding id"
    mask = real_token_mask(tokens)
    end = tokens.argmax(dim=1)  # end-of-text, the highest id
    for row in range(2):
        assert mask[row, : end[row] + 1].all() and not mask[row, end[row] + 1 :].any()


def test_patch_mask_drops_patches(pixels):
    from detailfusion.train.data import patch_mask  # the mask stage 1's task draws

    model = build().eval()
    ref, tokens, _ = inputs(model, pixels)
    mask = patch_mask(BATCH, model.num_patches, 0.5, torch.Generator().manual_seed(1))
    assert mask.shape == (BATCH, 64) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [32] * BATCH
    with torch.no_grad():
        _, kept_tokens = model.backbone.encode_image(ref, mask)
        assert kept_tokens.shape == (BATCH, 32, model.backbone.vision_width)
        masked = model.encode_query(ref, tokens, patch_mask=mask)
        unmasked = model.encode_query(ref, tokens)
        assert not torch.allclose(masked["query"], unmasked["query"], atol=1e-4)
        assert not torch.allclose(model.encode_target(ref, mask), model.encode_target(ref), atol=1e-4)

        # Dropped really means dropped: scribbling over a masked patch changes nothing, over a kept one it does.
        grid = model.backbone.clip.visual.grid_size[1]
        patch = 8

        def scribble(index: int) -> torch.Tensor:
            edited = ref.clone()
            row, col = divmod(index, grid)
            edited[0, :, row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] = 3.0
            return model.encode_query(edited, tokens, patch_mask=mask)["query"][0]

        masked_idx = int(mask[0].nonzero()[0])
        kept_idx = int((~mask[0]).nonzero()[0])
        assert torch.allclose(scribble(masked_idx), masked["query"][0], atol=1e-6)
        assert not torch.allclose(scribble(kept_idx), masked["query"][0], atol=1e-4)

    uneven = torch.zeros(BATCH, 64, dtype=torch.bool)
    uneven[0, :3] = True
    with pytest.raises(ValueError, match="same, non-zero number"):
        model.backbone.encode_image(ref, uneven)
    with pytest.raises(ValueError, match="patch_mask must be bool"):
        model.backbone.encode_image(ref, torch.zeros(BATCH, 10, dtype=torch.bool))


def test_di_branch_ignores_padded_caption_positions(pixels):
    model = build(variant="di_only").eval()
    ref, tokens, _ = inputs(model, pixels)
    with torch.no_grad():
        _, patches = model.backbone.encode_image(ref)
        _, feats, mask = model.backbone.encode_text(tokens)
        q_di, query_out = model.di(feats, mask, patches)
        noisy = torch.where(mask.unsqueeze(-1), feats, torch.randn_like(feats) * 10)
        assert torch.allclose(model.di(noisy, mask, patches)[0], q_di, atol=1e-5)
        real = feats.clone()
        real[:, 1] += 1.0  # the first word of every caption
        assert not torch.allclose(model.di(real, mask, patches)[0], q_di, atol=1e-4)
    assert query_out.shape == (BATCH, model.config.di.num_queries, model.config.di.hidden_size)


def test_preprocess_uint8_normalises_and_resizes():
    model = build(variant="gm_only")
    flat = np.full((2, 96, 80, 3), 128, dtype=np.uint8)
    x = model.preprocess_uint8(flat)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    expected = (128 / 255 - torch.tensor(model.backbone.mean)) / torch.tensor(model.backbone.std)
    assert torch.allclose(x[0, :, 10, 10], expected, atol=1e-5)
    assert model.preprocess_uint8(torch.from_numpy(flat[0])).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="uint8"):
        model.preprocess_uint8(flat.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        model.preprocess_uint8(np.zeros((2, 3, 64, 64), dtype=np.uint8))


def test_tokenizer_is_offline_and_pads(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build(variant="gm_only")
    long_caption = " ".join(["very"] * 100) + " red"
    tokens = model.tokenize([CAPTIONS[0], long_caption])
    assert tokens.shape == (2, 32) and tokens.dtype == torch.long
    assert (tokens[:, 0] == 49406).all()
    first_len = int((tokens[0] != 0).sum())
    assert tokens[0, first_len - 1] == 49407 and (tokens[0, first_len:] == 0).all()
    assert tokens[1, -1] == 49407, "truncated captions keep the end-of-text token"
    with pytest.raises(TypeError, match="list of strings"):
        model.tokenize("one string")


def test_backbone_loads_local_checkpoint(tmp_path, tiny_config):
    source = build(variant="gm_only", seed=5).backbone.clip
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    state["logit_scale"] = torch.tensor(2.0)  # an open_clip checkpoint carries its own temperature
    path = tmp_path / "clip.safetensors"
    save_file(state, str(path))
    backbone = dataclasses.replace(tiny_config.backbone, pretrained=str(path))
    model = build(dataclasses.replace(tiny_config, backbone=backbone), variant="gm_only", seed=6)
    loaded = model.backbone.clip.state_dict()
    assert all(torch.equal(loaded[k], source.state_dict()[k]) for k in loaded)

    missing = dataclasses.replace(tiny_config.backbone, pretrained=str(tmp_path / "nope.safetensors"))
    with pytest.raises(ConfigError, match="nope.safetensors"):
        create_model(dataclasses.replace(tiny_config, backbone=missing), "gm_only")


@pytest.mark.slow
def test_vit_b_32_config_builds_and_runs():
    model = create_model("vit-b-32", "full").eval()
    assert model.backbone.image_size == 224 and model.embed_dim == 512
    x = model.preprocess_uint8(np.zeros((1, 64, 64, 3), dtype=np.uint8))
    with torch.no_grad():
        out = model.encode_query(x, model.tokenize(["a red dress"]))
    assert out["query"].shape == (1, 512) and out["di_tokens"].shape == (1, 32, 768)


# ---------------------------------------------------------------------------- save / load


def test_save_load_round_trip_is_exact(tmp_path, pixels):
    model = build(seed=3).eval()
    with torch.no_grad():
        model.logit_scale_log.add_(0.5)  # a trained value, not the init
    directory = save_pretrained(model, tmp_path / "ckpt")
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((directory / "config.json").read_text())
    assert meta["variant"] == "full" and meta["model"]["name"] == "tiny"

    loaded = load_pretrained(directory).eval()
    assert loaded.config == model.config and loaded.variant == model.variant
    assert loaded.load_report.clean
    ref, tokens, target = inputs(model, pixels)
    with torch.no_grad():
        a, b = model.encode_query(ref, tokens), loaded.encode_query(ref, tokens)
        for key in ("query", "gm", "di", "weights"):
            assert torch.equal(a[key], b[key])
        assert torch.equal(model.encode_target(target), loaded.encode_target(target))
    assert torch.equal(model.logit_scale, loaded.logit_scale)


def test_load_other_variant_reports_missing_keys(tmp_path):
    stage2 = build(variant="gm_only", seed=4)
    directory = save_pretrained(stage2, tmp_path / "gm")
    full = load_pretrained(directory, variant="full")
    assert full.variant.name == "full"
    assert full.load_report.unexpected == []
    assert {k.split(".")[0] for k in full.load_report.missing} == {"di", "afc"}
    assert torch.equal(full.gm.output.weight, stage2.gm.output.weight)
    assert "di.* x" in str(full.load_report)

    # Back again: a full checkpoint into gm_only leaves DI/AFC tensors unused.
    report = load_weights(build(variant="gm_only"), save_pretrained(full, tmp_path / "full"))
    assert report.missing == [] and {k.split(".")[0] for k in report.unexpected} == {"di", "afc"}
    with pytest.raises(ConfigError, match="does not match"):
        load_weights(build(variant="gm_only"), tmp_path / "full", strict=True)


def test_load_rejects_shape_mismatch(tmp_path, tiny_config):
    directory = save_pretrained(build(variant="gm_only"), tmp_path / "gm")
    wider = dataclasses.replace(tiny_config, gm=dataclasses.replace(tiny_config.gm, proj_dim=64))
    with pytest.raises(ConfigError, match=r"gm\.image_proj\.weight"):
        load_weights(build(wider, variant="gm_only"), directory)


def test_tied_tensors_are_saved_once(tmp_path, pixels):
    model = build(variant="gm_only").eval()
    model.gm.text_proj.weight = model.gm.image_proj.weight
    directory = save_pretrained(model, tmp_path / "tied")
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
    assert ("gm.text_proj.weight" in names) != ("gm.image_proj.weight" in names)
    loaded = load_pretrained(directory).eval()
    ref, tokens, _ = inputs(model, pixels)
    with torch.no_grad():
        assert torch.equal(
            loaded.encode_query(ref, tokens)["query"], model.encode_query(ref, tokens)["query"]
        )


def test_load_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_pretrained(tmp_path)


# ---------------------------------------------------------------------------- configs and factory


@pytest.mark.parametrize("name", list_models())
def test_config_json_round_trip(name):
    cfg = get_model_config(name)
    assert cfg.name == name
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_shipped_configs():
    assert {"tiny", "vit-b-32"} <= set(list_models())
    tiny = get_model_config("tiny")
    assert tiny.backbone.clip_config["vision_cfg"]["image_size"] == 64
    assert (tiny.di.num_queries, tiny.di.num_layers, tiny.afc.layers) == (8, 2, 1)
    vit = get_model_config("vit-b-32")
    assert (vit.backbone.arch, vit.backbone.pretrained, vit.backbone.image_size) == ("ViT-B-32", None, 224)
    assert (vit.di.num_queries, vit.di.hidden_size) == (32, 768)


def test_create_model_from_name_path_and_dict(tmp_path, pixels):
    data = get_model_config("tiny").to_dict()
    data["di"]["num_queries"] = 4
    data.pop("name")
    path = tmp_path / "four-queries.json"
    path.write_text(json.dumps(data))
    from_path = create_model(str(path), "di_only")
    assert from_path.config.name == "four-queries" and from_path.config.di.num_queries == 4
    ref, tokens, _ = inputs(from_path, pixels)
    assert from_path.encode_query(ref, tokens)["di_tokens"].shape == (BATCH, 4, 128)

    from_dict = create_model(data, "di_only")
    assert from_dict.config.di.num_queries == 4
    assert create_model(CONFIG_DIR / "tiny.json", "gm_only").config.name == "tiny"
    assert create_model("tiny", VARIANTS["avg_fusion"]).variant.name == "avg_fusion"


def test_config_and_variant_errors_name_the_problem(tmp_path, tiny_config):
    with pytest.raises(ConfigError, match="unknown model variant 'gm_plus'"):
        create_model("tiny", "gm_plus")
    with pytest.raises(ConfigError, match="unknown model config 'tinyy'"):
        create_model("tinyy")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        create_model(bad)
    data = tiny_config.to_dict()
    data["di"]["num_querys"] = 3
    with pytest.raises(ConfigError, match="num_querys"):
        create_model(data)
    data = tiny_config.to_dict()
    data["di"]["num_heads"] = 3
    with pytest.raises(ConfigError, match="not a multiple of num_heads"):
        create_model(data)
    data = tiny_config.to_dict()
    data["backbone"]["arch"] = "ViT-B-32"
    with pytest.raises(ConfigError, match="exactly one of"):
        create_model(data)
    data = tiny_config.to_dict()
    data["afc"]["gate"] = "softmax"
    with pytest.raises(ConfigError, match="afc.gate"):
        create_model(data)
