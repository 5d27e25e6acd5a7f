"""IPr2Pr-format atomic edits, written as Hugging Face style parquet shards.

Each original scene gets ``edits_per_original`` distinct single-attribute edits of one object
(one row each), so rows that share an original are same-original hard negatives. The prompts
are scene descriptions and the edit prompt is a paraphrased instruction. The parquet layout is
the one of ``timbrooks/instructpix2pix-clip-filtered``: image columns are
``struct<bytes: binary, path: string>`` holding PNG bytes (with a null path for edited images, and
one path per original, shared by its rows: :func:`original_path`), and the schema
carries the ``huggingface`` features metadata so ``datasets`` decodes them as images.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from detailfusion.data.synthetic.rng import Stream
from detailfusion.data.synthetic.scenes import (
    DETAIL_EDITS,
    Scene,
    apply_edit,
    describe_edit,
    describe_scene,
    random_scene,
    sample_edit,
)

COLUMNS = ("original_prompt", "original_image", "edit_prompt", "edited_prompt", "edited_image")
_HF_FEATURES = {
    "original_prompt": {"dtype": "string", "_type": "Value"},
    "original_image": {"_type": "Image"},
    "edit_prompt": {"dtype": "string", "_type": "Value"},
    "edited_prompt": {"dtype": "string", "_type": "Value"},
    "edited_image": {"_type": "Image"},
}


@dataclass
class Ipr2prRow:
    original: int  # index of the original scene
    original_prompt: str
    edit_prompt: str
    edited_prompt: str
    edited: Scene
    kind: str


@dataclass
class Ipr2prData:
    originals: list[Scene] = field(default_factory=list)
    rows: list[Ipr2prRow] = field(default_factory=list)


def build_ipr2pr(seed: int, originals: int, edits_per_original: int,
                 on_original: Callable[[int], None] | None = None) -> Ipr2prData:
    rng = Stream(seed, "ipr2pr")
    data = Ipr2prData()
    for i in range(originals):
        ref = random_scene(rng)
        data.originals.append(ref)
        prompt = describe_scene(ref)
        keys = {ref.key()}
        kinds = rng.shuffle(list(DETAIL_EDITS))  # different edit types per original where possible
        for k in range(edits_per_original):
            preferred = kinds[k % len(kinds)]
            for attempt in range(40):
                kind = preferred if attempt < 10 else rng.choice(DETAIL_EDITS)
                edit = sample_edit(rng, ref, kind)
                if edit is None:
                    continue
                edited = apply_edit(ref, edit, rng)
                if edited.key() not in keys:
                    break
            else:
                raise RuntimeError(f"no distinct atomic edit found for IPr2Pr original {i}")
            keys.add(edited.key())
            data.rows.append(Ipr2prRow(i, prompt, describe_edit(rng, ref, edit), describe_scene(edited), edited,
                                       edit.kind))
        if on_original:
            on_original(1)
    return data


def original_path(index: int) -> str:
    """The ``path`` of an original's image struct. Rows of one original share the image, and the
    path says so: readers then keep one gallery image per original instead of one per row, which
    halves what ``prepare`` decodes. Edited images keep a null path, as in the HF release."""
    return f"original-{index:06d}.png"


def shard_bounds(originals: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous ranges of originals per shard, so an original's rows stay in one shard."""
    return [(originals * s // shards, originals * (s + 1) // shards) for s in range(shards)]


def write_shards(root: Path, data: Ipr2prData, original_png: list[bytes], edited_png: list[bytes],
                 shards: int) -> dict[str, list[list[str]]]:
    """Write ``root/data/train-XXXXX-of-NNNNN-<hash>.parquet``; return the sidecar (edit types per row).

    The name's hash is the first 8 hex digits of the shard's sha256, so it identifies the content.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
    schema = pa.schema(
        [
            pa.field("original_prompt", pa.string()),
            pa.field("original_image", image),
            pa.field("edit_prompt", pa.string()),
            pa.field("edited_prompt", pa.string()),
            pa.field("edited_image", image),
        ],
        metadata={"huggingface": json.dumps({"info": {"features": _HF_FEATURES}})},
    )
    (root / "data").mkdir(parents=True, exist_ok=True)
    sidecar: dict[str, list[list[str]]] = {}
    row_index = 0
    for s, (lo, hi) in enumerate(shard_bounds(len(data.originals), shards)):
        rows = []
        while row_index < len(data.rows) and data.rows[row_index].original < hi:
            rows.append(row_index)
            row_index += 1
        assert all(lo <= data.rows[r].original < hi for r in rows)
        table = pa.table(
            {
                "original_prompt": [data.rows[r].original_prompt for r in rows],
                "original_image": [{"bytes": original_png[data.rows[r].original],
                                    "path": original_path(data.rows[r].original)} for r in rows],
                "edit_prompt": [data.rows[r].edit_prompt for r in rows],
                "edited_prompt": [data.rows[r].edited_prompt for r in rows],
                "edited_image": [{"bytes": edited_png[r], "path": None} for r in rows],
            },
            schema=schema,
        )
        buf = io.BytesIO()
        # Fixed writer options; pyarrow writes no timestamps, so equal tables give equal bytes.
        pq.write_table(table, buf, compression="snappy", row_group_size=1000, write_statistics=False)
        payload = buf.getvalue()
        name = f"train-{s:05d}-of-{shards:05d}-{hashlib.sha256(payload).hexdigest()[:8]}.parquet"
        (root / "data" / name).write_bytes(payload)
        sidecar[name] = [[data.rows[r].kind] for r in rows]
    return sidecar
