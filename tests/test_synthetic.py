"""The synthetic benchmark generator: native formats, determinism, no shortcuts, atomic writes."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import params_file
from PIL import Image

from detailfusion.config import load_section, to_dict
from detailfusion.data.synthetic import (
    DETAIL_EDITS,
    EDIT_TYPES,
    FIQ_EDITS,
    CirrSynthConfig,
    FiqSynthConfig,
    Ipr2prSynthConfig,
    SynthConfig,
    generate,
)
from detailfusion.data.synthetic import render as render_mod
from detailfusion.data.synthetic.cirr import build_sets
from detailfusion.data.synthetic.pairs import edits_between
from detailfusion.data.synthetic.rng import Stream
from detailfusion.data.synthetic.scenes import apply_edit, random_scene, sample_edit
from detailfusion.errors import ConfigError

IMAGE_SIZE = 64
CIRR_N = {"train": 60, "val": 240, "test1": 20}
FIQ_N = {"train": 8, "val": 5, "test": 4}
CATS = ("dress", "shirt", "toptee")


def tiny_config(seed: int = 11, **cirr) -> SynthConfig:
    return SynthConfig(
        seed=seed,
        image_size=IMAGE_SIZE,
        render_scale=2,
        cirr=CirrSynthConfig(
            train_queries=cirr.get("train", CIRR_N["train"]),
            val_queries=CIRR_N["val"],
            test1_queries=CIRR_N["test1"],
            queries_per_set=8,
            two_edit_fraction=0.3,
            shared_fraction=0.24,
        ),
        fashioniq=FiqSynthConfig(
            train_per_category=FIQ_N["train"], val_per_category=FIQ_N["val"], test_per_category=FIQ_N["test"],
            shared_fraction=0.1,
        ),
        ipr2pr=Ipr2prSynthConfig(originals=12, edits_per_original=3, shards=2),
    )


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


def load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "synthetic"
    summary = generate(tiny_config(), root, progress=False, workers=1)
    assert summary["counts"]["cirr"]["val"]["queries"] == CIRR_N["val"]
    return root


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_output_with_any_worker_count(out, tmp_path, monkeypatch):
    # Force the process pool even for this small run: the bytes must not depend on it.
    monkeypatch.setattr(render_mod, "PARALLEL_MIN_JOBS", 0)
    again = tmp_path / "again"
    generate(tiny_config(), again, progress=False, workers=2)
    assert file_hashes(again) == file_hashes(out)


def test_other_seed_gives_other_content(out, tmp_path):
    other = tmp_path / "other"
    generate(tiny_config(seed=12), other, progress=False, workers=1)
    a, b = file_hashes(out), file_hashes(other)
    for rel in ("cirr/captions/cap.rc2.val.json", "fashioniq/captions/cap.dress.train.json",
                "cirr/image_splits/split.rc2.train.json"):
        assert a[rel] != b[rel], rel
    assert [k for k in b if k.startswith("ipr2pr/data/")] != [k for k in a if k.startswith("ipr2pr/data/")]


def test_val_and_test1_do_not_depend_on_train_size(out, tmp_path):
    bigger = tmp_path / "bigger"
    generate(tiny_config(train=100), bigger, progress=False, workers=1)
    a, b = file_hashes(out), file_hashes(bigger)
    for split in ("val", "test1"):
        for rel in (f"cirr/captions/cap.rc2.{split}.json", f"cirr/image_splits/split.rc2.{split}.json"):
            assert a[rel] == b[rel], rel
    assert a["cirr/captions/cap.rc2.train.json"] != b["cirr/captions/cap.rc2.train.json"]


# --------------------------------------------------------------------------- CIRR

NAME_RE = {
    "train": re.compile(r"^train-\d+-[0-3]-img[01]$"),
    "val": re.compile(r"^dev-\d+-[0-3]-img[01]$"),
    "test1": re.compile(r"^test1-\d+-[0-3]-img[01]$"),
}


def _cirr(out: Path, split: str) -> tuple[list[dict], dict[str, str]]:
    root = out / "cirr"
    return load(root / "captions" / f"cap.rc2.{split}.json"), load(root / "image_splits" / f"split.rc2.{split}.json")


def test_cirr_records_have_the_native_structure(out):
    pairids: list[int] = []
    names_per_split = {}
    sidecar = load(out / "cirr" / "synthetic_edits.json")
    for split in ("train", "val", "test1"):
        records, split_map = _cirr(out, split)
        assert len(records) == CIRR_N[split]
        names_per_split[split] = set(split_map)
        members_by_set: dict[int, list[str]] = {}
        seen_members: set[str] = set()
        for r in records:
            assert isinstance(r["pairid"], int) and not isinstance(r["pairid"], bool)
            pairids.append(r["pairid"])
            img_set = r["img_set"]
            if split == "test1":
                assert set(r) == {"pairid", "reference", "caption", "img_set"}
                assert set(img_set) == {"id", "members", "reference_rank"}
            else:
                assert list(r) == ["pairid", "reference", "target_hard", "target_soft", "caption", "img_set"]
                assert set(img_set) == {"id", "members", "reference_rank", "target_rank"}
                assert r["target_hard"] != r["reference"]
                assert r["target_soft"] == {r["target_hard"]: 1.0}
                assert r["target_hard"] in img_set["members"]
                assert 0 <= img_set["target_rank"] <= 5
            members = img_set["members"]
            assert len(members) == 6 and len(set(members)) == 6
            assert r["reference"] in members
            assert all(m in split_map for m in members)
            assert 0 <= img_set["reference_rank"] <= 5
            assert isinstance(r["caption"], str) and r["caption"] == r["caption"].strip() and r["caption"]
            # Queries sharing a set id share the member list (not the reference: any member can be one).
            assert members_by_set.setdefault(img_set["id"], members) == members
            seen_members.update(members)
            kinds = sidecar[split][str(r["pairid"])]
            assert 1 <= len(kinds) <= 2 and set(kinds) <= set(EDIT_TYPES)
            assert (" and " in r["caption"]) or len(kinds) == 1
        assert set(sidecar[split]) == {str(r["pairid"]) for r in records}
        # The gallery is exactly the union of the sets.
        assert seen_members == set(split_map)
        for name, rel in split_map.items():
            assert NAME_RE[split].match(name), name
            if split == "train":
                assert re.fullmatch(rf"\./train/(\d|[1-9]\d)/{re.escape(name)}\.png", rel), rel
            else:
                assert rel == f"./{'dev' if split == 'val' else 'test1'}/{name}.png"
    assert len(pairids) == len(set(pairids)), "pairids must be unique across splits"
    assert not (names_per_split["train"] & names_per_split["val"]) and not (names_per_split["val"] & names_per_split["test1"])


def test_cirr_images_exist_and_members_are_distinct_pictures(out):
    for split in ("val", "test1"):
        records, split_map = _cirr(out, split)
        pixels = {}
        for name, rel in split_map.items():
            with Image.open(out / "cirr" / rel) as im:
                assert im.format == "PNG" and im.mode == "RGB" and im.size == (IMAGE_SIZE, IMAGE_SIZE)
                pixels[name] = np.asarray(im).tobytes()
        for r in records:
            members = r["img_set"]["members"]
            assert len({pixels[m] for m in members}) == 6, f"pairid {r['pairid']}: two members look the same"


def test_every_query_edit_path_turns_its_reference_into_its_target():
    """Queries go in any direction inside a set; each caption's edits lead exactly from reference to target."""
    _, b = build_sets(3, "val", 800, 8, 0.3, 0.24)
    n_two = 0
    refs_per_set = []
    for image_set in b.sets:
        keys = [b.scenes[m].key() for m in image_set.members]
        assert len(image_set.members) == 6 and len(set(keys)) == 6, "members are distinct pictures"
        pairs = [(q.reference, q.target) for q in image_set.queries]
        assert len(set(pairs)) == len(pairs) and not any((t, r) in pairs for r, t in pairs)
        for q in image_set.queries:
            assert {q.reference, q.target} <= set(image_set.members) and q.reference != q.target
            scene = b.scenes[q.reference]
            for before, e in zip(q.befores, q.edits, strict=True):
                assert before.key() == scene.key()
                scene = apply_edit(scene, e)
            assert scene.key() == b.scenes[q.target].key()
            assert 1 <= len(q.edits) <= 2
            n_two += len(q.edits) == 2
        refs_per_set.append(len({q.reference for q in image_set.queries}))
    n = sum(len(s.queries) for s in b.sets)
    assert n == 800 and 0.2 < n_two / n < 0.45
    assert np.mean(refs_per_set) > 4, "not a star: most members are the reference of some query"


def test_edits_between_inverts_and_composes_edits():
    rng = Stream(5, "test-pairs")
    for _ in range(200):
        centre = random_scene(rng)
        e1 = sample_edit(rng, centre, rng.choice(["colour", "add", "remove", "position", "background"]))
        if e1 is None:
            continue
        v1 = apply_edit(centre, e1, rng)
        back = edits_between(v1, centre)
        assert back is not None and len(back[0]) == 1, (e1, back)
        assert apply_edit(v1, back[0][0]).key() == centre.key()
        e2 = sample_edit(rng, centre, "pattern", avoid=e1.touched)
        if e2 is None:
            continue
        v2 = apply_edit(centre, e2, rng)
        found = edits_between(v1, v2)  # undo e1, then apply e2
        assert found is not None and len(found[0]) == 2
    assert edits_between(centre, centre) is None


def test_sets_share_images_and_hold_queries_per_set_as_configured(out):
    """Real CIRR val: 8.3 queries per set, 24 % of the images in more than one set (the tiny config asks 8, 0.24)."""
    from detailfusion.data.stats import dataset_stats

    val = dataset_stats("cirr", out / "cirr", split="val")["splits"]["val"]["structure"]
    assert val["sets"] == 30 and val["queries_per_set"] == 8.0 and val["images_per_set"] == 6.0
    assert 0.2 <= val["shared_image_fraction"] <= 0.28
    assert val["references_per_set"] > 4  # most members are the reference of some query
    records, _ = _cirr(out, "val")
    sets_of: dict[str, set[int]] = defaultdict(set)
    for r in records:
        for m in r["img_set"]["members"]:
            sets_of[m].add(r["img_set"]["id"])
    assert sum(len(v) > 1 for v in sets_of.values()) == val["shared_images"] > 0
    none = build_sets(3, "val", 400, 5, 0.3, 0.0)[1]
    assert max(Counter(m for s in none.sets for m in s.members).values()) == 1
    assert Counter(len(s.queries) for s in none.sets) == {5: 80}


def test_test1_targets_sidecar_round_trips_into_the_manifest(out):
    from detailfusion.data import read_cirr

    records, _ = _cirr(out, "test1")
    targets = load(out / "cirr" / "synthetic_targets.json")
    assert set(targets) == {"test1"} and set(targets["test1"]) == {str(r["pairid"]) for r in records}
    for r in records:
        assert "target_hard" not in r  # the official file stays target-free
        t = targets["test1"][str(r["pairid"])]
        assert t in r["img_set"]["members"] and t != r["reference"]
    q = read_cirr(out / "cirr").queries
    test1 = q[q["split"] == "test1"]
    assert dict(zip(test1["query_id"], test1["target"], strict=True)) == targets["test1"]
    assert test1["target_soft"].isna().all()


def test_reference_alone_does_not_single_out_the_target(out):
    """Calibration pitfall 1: a pixel nearest neighbour of the reference must stay near chance (20%)."""
    records, split_map = _cirr(out, "val")
    names = list(split_map)
    x = np.stack([np.asarray(Image.open(out / "cirr" / split_map[n]), dtype=np.float32).ravel() for n in names])
    x -= x.mean(axis=0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = {n: i for i, n in enumerate(names)}
    hits = 0
    for r in records:
        cands = [m for m in r["img_set"]["members"] if m != r["reference"]]
        sims = x[[index[m] for m in cands]] @ x[index[r["reference"]]]
        hits += cands[int(np.argmax(sims))] == r["target_hard"]
    assert len(records) >= 200
    assert hits / len(records) < 0.35


def test_edit_types_cover_global_and_detail_edits(out):
    sidecar = load(out / "cirr" / "synthetic_edits.json")
    kinds = Counter(k for split in sidecar.values() for ks in split.values() for k in ks)
    assert set(DETAIL_EDITS) <= set(kinds)
    assert {"background", "style", "recolour_all"} & set(kinds)
    n = sum(len(v) for v in sidecar.values())
    n_two = sum(len(ks) == 2 for split in sidecar.values() for ks in split.values())
    assert 0.15 < n_two / n < 0.45


# --------------------------------------------------------------------------- FashionIQ

ASIN_RE = re.compile(r"^B0[0-9A-Z]{8}$")


def test_fashioniq_files_have_the_native_structure_and_quirks(out):
    root = out / "fashioniq"
    sidecar = load(root / "synthetic_edits.json")
    lists = {}
    for cat in CATS:
        for split in ("train", "val", "test"):
            records = load(root / "captions" / f"cap.{cat}.{split}.json")
            listed = load(root / "image_splits" / f"split.{cat}.{split}.json")
            lists[(cat, split)] = listed
            assert len(records) == FIQ_N[split]
            assert len(listed) == len(set(listed)) and all(ASIN_RE.match(a) for a in listed)
            captions = [c for r in records for c in r["captions"]]
            assert captions.count("") == 1
            assert any(c.startswith(" ") for c in captions) and any(c.endswith(".") for c in captions)
            for r in records:
                if split == "test":
                    assert list(r) == ["candidate", "captions"]
                else:
                    assert list(r) == ["target", "candidate", "captions"]
                    assert r["target"] in listed and r["target"] != r["candidate"]
                assert r["candidate"] in listed
                assert len(r["captions"]) == 2 and all(isinstance(c, str) for c in r["captions"])
                assert any(c.strip(" .") for c in r["captions"]), "at least one caption says something"
            edits = sidecar[f"{cat}.{split}"]
            assert len(edits) == len(records) and all(1 <= len(e) <= 2 and set(e) <= set(FIQ_EDITS) for e in edits)
    for split in ("train", "val", "test"):
        assert set(lists[("shirt", split)]) & set(lists[("toptee", split)]), "shirt/toptee must share some images"
        assert not set(lists[("dress", split)]) & set(lists[("shirt", split)])
    every = {a for listed in lists.values() for a in listed}
    files = {p.stem for p in (root / "images").iterdir()}
    assert files == every
    with Image.open(root / "images" / f"{sorted(every)[0]}.png") as im:
        assert im.format == "PNG" and im.size == (IMAGE_SIZE, IMAGE_SIZE)


# --------------------------------------------------------------------------- IPr2Pr


def test_ipr2pr_shards_use_the_hf_parquet_schema(out):
    root = out / "ipr2pr"
    shards = sorted((root / "data").iterdir())
    assert len(shards) == 2
    for i, p in enumerate(shards):
        assert re.fullmatch(rf"train-0000{i}-of-00002-[0-9a-f]{{8}}\.parquet", p.name), p.name
    image = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
    expected = pa.schema([
        pa.field("original_prompt", pa.string()),
        pa.field("original_image", image),
        pa.field("edit_prompt", pa.string()),
        pa.field("edited_prompt", pa.string()),
        pa.field("edited_image", image),
    ])
    sidecar = load(root / "synthetic_edits.json")
    assert set(sidecar) == {p.name for p in shards}
    rows = []
    for p in shards:
        table = pq.read_table(p)
        assert table.schema.equals(expected, check_metadata=False)
        features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
        assert features["original_image"] == {"_type": "Image"} and features["edited_image"] == {"_type": "Image"}
        assert len(sidecar[p.name]) == table.num_rows
        assert all(len(k) == 1 and k[0] in DETAIL_EDITS for k in sidecar[p.name])
        rows.extend(table.to_pylist())
    assert len(rows) == 12 * 3
    groups = defaultdict(list)
    for r in rows:
        assert r["edited_image"]["path"] is None
        for col in ("original_image", "edited_image"):
            with Image.open(io.BytesIO(r[col]["bytes"])) as im:
                assert im.format == "PNG" and im.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert r["original_image"]["bytes"] != r["edited_image"]["bytes"]
        assert r["original_prompt"] != r["edited_prompt"] and r["edit_prompt"]
        groups[r["original_image"]["bytes"]].append(r)
    # Every original has exactly edits_per_original distinct edits (same-original hard negatives).
    assert len(groups) == 12
    for g in groups.values():
        assert len(g) == 3 and len({r["edited_image"]["bytes"] for r in g}) == 3
        assert len({r["original_prompt"] for r in g}) == 1
        # one path per original, so the reader keeps one gallery image per original
        assert len({r["original_image"]["path"] for r in g}) == 1
    assert len({g[0]["original_image"]["path"] for g in groups.values()}) == 12


# --------------------------------------------------------------------------- marker, config, CLI


def test_marker_records_config_and_counts(out):
    meta = load(out / "SYNTHETIC.json")
    assert meta["config"] == to_dict(tiny_config())
    assert meta["counts"]["cirr"]["val"]["queries"] == 240 and meta["counts"]["cirr"]["val"]["sets"] == 30
    assert meta["counts"]["ipr2pr"]["rows"] == 36


def test_config_keys_match_params_yaml():
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    cfg = load_section(SynthConfig, params, "synthesize")
    assert to_dict(cfg) == params["synthesize"]


@pytest.mark.parametrize(
    "path, value",
    [
        (("image_size",), 8),
        (("render_scale",), 0),
        (("seed",), -1),
        (("cirr", "queries_per_set"), 0),
        (("cirr", "queries_per_set"), 16),
        (("cirr", "shared_fraction"), 0.35),
        (("cirr", "shared_fraction"), -0.1),
        (("cirr", "two_edit_fraction"), 1.5),
        (("cirr", "train_queries"), 0),
        (("fashioniq", "shared_fraction"), -0.1),
        (("fashioniq", "val_per_category"), -3),
        (("ipr2pr", "shards"), 13),
        (("ipr2pr", "edits_per_original"), 0),
    ],
)
def test_invalid_config_fails_before_anything_is_written(tmp_path, path, value):
    cfg = tiny_config()
    obj = cfg
    for key in path[:-1]:
        obj = getattr(obj, key)
    setattr(obj, path[-1], value)
    target = tmp_path / "parent" / "synthetic"
    with pytest.raises(ConfigError, match=path[-1]):
        generate(cfg, target, progress=False)
    assert not (tmp_path / "parent").exists()
    # The same value coming from params.yaml is rejected by load_section too.
    params = {"synthesize": to_dict(cfg)}
    with pytest.raises(ConfigError, match=path[-1]):
        load_section(SynthConfig, params, "synthesize")


def _small() -> SynthConfig:
    cfg = tiny_config()
    cfg.cirr = CirrSynthConfig(train_queries=8, val_queries=8, test1_queries=4, queries_per_set=4, two_edit_fraction=0.3,
                               shared_fraction=0.24)
    cfg.fashioniq = FiqSynthConfig(train_per_category=2, val_per_category=2, test_per_category=2, shared_fraction=0.1)
    cfg.ipr2pr = Ipr2prSynthConfig(originals=2, edits_per_original=2, shards=1)
    return cfg


@pytest.mark.parametrize("workers", [1, 2])
def test_failure_midway_keeps_the_previous_output(tmp_path, monkeypatch, workers):
    target = tmp_path / "synthetic"
    generate(_small(), target, progress=False, workers=1)
    before = file_hashes(target)

    def broken(*args, **kwargs):
        raise RuntimeError("renderer exploded")

    monkeypatch.setattr(render_mod, "render_garment", broken)
    monkeypatch.setattr(render_mod, "PARALLEL_MIN_JOBS", 0)  # with workers=2, fail inside the process pool
    with pytest.raises(RuntimeError, match="exploded"):
        generate(_small(), target, progress=False, workers=workers)
    assert file_hashes(target) == before
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="exploded"):
        generate(_small(), fresh, progress=False, workers=workers)
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"], "no temporary folders left behind"


def test_regenerating_replaces_previous_output_and_refuses_foreign_folders(tmp_path):
    target = tmp_path / "synthetic"
    generate(_small(), target, progress=False, workers=1)
    (target / "stale.txt").write_text("old")
    generate(_small(), target, progress=False, workers=1)
    assert not (target / "stale.txt").exists() and (target / "SYNTHETIC.json").is_file()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="refusing"):
        generate(_small(), foreign, progress=False, workers=1)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_cli_synth_writes_the_benchmark(tmp_path, capsys):
    from detailfusion.cli import main

    params = {"data": {"root": str(tmp_path / "data" / "synthetic")}, "synthesize": to_dict(_small())}
    p = params_file(tmp_path / "params.yaml", params)
    assert main(["--params", str(p), "-q", "data", "synth", "--seed", "5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["seed"] == 5 and summary["counts"]["cirr"]["train"]["queries"] == 8
    assert load(tmp_path / "data" / "synthetic" / "SYNTHETIC.json")["config"]["seed"] == 5

    bad = copy.deepcopy(params)
    bad["synthesize"]["cirr"]["queries_per_set"] = 16
    params_file(p, bad)
    assert main(["--params", str(p), "-q", "data", "synth"]) == 2
    assert "queries_per_set" in capsys.readouterr().err
