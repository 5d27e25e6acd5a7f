"""Recall-curve CSV/PNG and the self-contained HTML retrieval report."""

from __future__ import annotations

import base64
import csv
import io
import re

import numpy as np
import pytest
from PIL import Image

from detailfusion.eval.metrics import EvalInputError
from detailfusion.eval.plots import SERIES, recall_curve_rows, write_edit_type_breakdown, write_recall_curves
from detailfusion.eval.report import ReportSample, write_retrieval_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_recall_curves_csv_and_png(tmp_path):
    curves = {
        "model": {10: 74.0, 1: 26.8, 50: 93.6, 5: 60.4},
        "pixel_reference": {1: 10.0, 5: 65.4, 10: 71.4, 50: 77.0},
    }
    csv_path, png_path = write_recall_curves(
        curves, tmp_path / "plots" / "recall.csv", tmp_path / "plots" / "recall.png"
    )
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        # wide: one column per series (every known series, empty where absent) so DVC draws one line each
        assert reader.fieldnames == ["k", *SERIES]
        rows = list(reader)
    assert [(int(r["k"]), r["model"], r["pixel_reference"], r["gm"]) for r in rows] == [
        (1, "26.8", "10.0", ""), (5, "60.4", "65.4", ""), (10, "74.0", "71.4", ""), (50, "93.6", "77.0", ""),
    ]  # fmt: skip
    assert png_path.read_bytes()[:8] == PNG_MAGIC
    assert Image.open(png_path).size == (600, 400)
    only_csv, no_png = write_recall_curves({"a": {1: 5.0}}, tmp_path / "only.csv")
    assert no_png is None and only_csv.read_text().splitlines() == ["k,model,gm,di,reference_only,text_only,pixel_reference,a",
                                                                    "1,,,,,,,5.0"]


def test_edit_type_breakdown_csv(tmp_path):
    path = write_edit_type_breakdown({"size": {"R@1": 20.8, "Rsub@1": 52.8, "n": 159},
                                      "colour": {"R@1": 30.0, "Rsub@1": 60.0, "n": 10}}, tmp_path / "e.csv")
    assert path.read_text().splitlines() == ["edit_type,queries,R@1,Rsub@1", "colour,10,30.0,60.0",
                                             "size,159,20.8,52.8"]


def test_recall_curve_rows_reject_bad_points():
    with pytest.raises(EvalInputError, match="'a': invalid point K=0"):
        recall_curve_rows({"a": {0: 5.0}})
    with pytest.raises(EvalInputError, match="invalid point"):
        recall_curve_rows({"a": {1: float("nan")}})


def _image(value: int) -> np.ndarray:
    img = np.zeros((8, 6, 3), dtype=np.uint8)
    img[..., 0] = value
    img[2, 3] = (1, 2, 3)
    return img


def _samples() -> list[ReportSample]:
    return [
        ReportSample(
            query_id="101",
            reference_image=_image(10),
            caption='make the <b>red</b> circle "blue" & <script>alert(1)</script>',
            result_names=["img-a", "img-b", "img-c"],
            result_scores=[0.91, 0.85, 0.5],
            result_images=[_image(20), _image(30), _image(40)],
            target="img-b",
            reference_name="img-ref",
            branch_weights=(0.625, 0.375),
        ),
        ReportSample(
            query_id="102",
            reference_image=_image(50),
            caption="remove the square",
            result_names=["img-d", "img-e"],
            result_scores=[0.7, 0.6],
            result_images=[_image(60), _image(70)],
            target="img-zz",
            notes=["edit types: remove"],
        ),
        ReportSample(
            query_id="103",
            reference_image=_image(80),
            caption="test query",
            result_names=["img-f"],
            result_scores=[0.3],
            result_images=[_image(90)],
        ),
    ]


def test_retrieval_report_is_self_contained_and_escaped(tmp_path):
    path = write_retrieval_report(tmp_path / "reports" / "examples.html", _samples(), "CIRR <val> examples")
    text = path.read_text(encoding="utf-8")
    assert text.count('<section class="sample"') == 3
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(uris) == (1 + 3) + (1 + 2) + (1 + 1)
    # Images survive the round trip bit for bit; nothing is loaded from outside the file.
    first = np.asarray(Image.open(io.BytesIO(base64.b64decode(uris[0]))))
    np.testing.assert_array_equal(first, _image(10))
    assert not re.search(r'(src|href)="(?!data:)', text)
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&quot;blue&quot; &amp;" in text
    assert "<title>CIRR &lt;val&gt; examples</title>" in text
    blocks = text.split('<section class="sample"')[1:]
    assert blocks[0].count('class="result target"') == 1
    assert re.search(r'class="result target">.*?#2 img-b', blocks[0])
    assert "w_gm = 0.625, w_di = 0.375" in blocks[0] and "not in top" not in blocks[0]
    assert "target not in top-2: img-zz" in blocks[1] and "edit types: remove" in blocks[1]
    assert 'class="result target"' not in blocks[1] and "w_gm" not in blocks[1]
    assert "target" not in blocks[2].replace('class="result"', "")  # test split: no target to mark
    assert "0.9100" in blocks[0] and "img-ref" in blocks[0]


def test_retrieval_report_rejects_bad_inputs(tmp_path):
    bad_image = _samples()[:1]
    bad_image[0].result_images[0] = np.zeros((8, 8, 3), dtype=np.float32)
    with pytest.raises(EvalInputError, match="uint8 H x W x 3"):
        write_retrieval_report(tmp_path / "a.html", bad_image, "t")
    mismatched = _samples()[:1]
    mismatched[0].result_scores = [0.1]
    with pytest.raises(EvalInputError, match="query '101': 3 result names, 1 scores"):
        write_retrieval_report(tmp_path / "b.html", mismatched, "t")
    assert list(tmp_path.iterdir()) == []
