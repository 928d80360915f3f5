"""``qcompress report``: the page built from a folder of reports of every kind, parsed back with an HTML
parser; the Pareto front on hand-made points; grouping by parent checkpoint; tables only without
matplotlib; and the page rendered by a real headless browser where Chromium is installed."""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from qcompress.jobs.report import ReportConfig, report
from qcompress.reports.zoo import FIDELITY, group_variants, pareto_front, read_folder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PARENT_SHA = "a" * 64
PRUNED_SHA = "b" * 64
INT8_SHA = "c" * 64


# ------------------------------------------------------------------------------ synthetic reports
def _latency(ms: float, threads: int = 1, **extra) -> dict:
    return {"batch_size": 1, "threads": threads, "runs": 20, "warmup": 5, "median_ms": ms, "p90_ms": ms * 1.1,
            "min_ms": ms * 0.9, "mean_ms": ms, "images_per_second": 1000 / ms, **extra}


def _eval(m_ap: float | None, metric: str = "voc07") -> dict:
    return {"metric": metric, "mAP": m_ap, "ap_per_class": {"circle": m_ap}, "num_images": 16, "num_objects": 40,
            "seconds": 1.0, "metric_seconds": 0.01, "extra": {}}


def _summary(path: str, sha: str, quantization: dict | None = None, compression: list | None = None) -> dict:
    return {"path": path, "sha256": sha, "arch": "toy", "classes": ["BACKGROUND", "circle"], "input_size": [64, 64],
            "quantization": quantization, "compression": compression or []}


RECIPE = {"scheme": "int8-eager-static", "backend": "x86", "observer": "histogram", "per_channel": True,
          "equalize": False, "bias_correction": None, "data_free": False, "calib_images": 32}


def _reports() -> dict[str, object]:
    parent = _summary("/models/toy.pth", PARENT_SHA)
    pruned_model = _summary("/models/toy-pruned.pth", PRUNED_SHA, compression=[{"step": "prune", "method": "channels"}])
    return {
        "quantize-toy": {
            "report": "quantize-toy", "command": "quantize", "model": parent, "out": "/models/toy-int8.pth",
            "recipe": RECIPE, "fp32": _eval(0.80), "int8": _eval(0.79), "fp32_latency": _latency(20.0),
            "int8_latency": _latency(8.0), "ort_fp32_latency": _latency(12.0, runtime="onnxruntime 1.20.1",
                                                                         intra_op_threads=1),
            "ort_int8_latency": "not exportable: a reason", "fp32_bytes": 4_000_000, "int8_bytes": 1_100_000,
            "layer_sqnr_db": {"conv1": 30.5, "block.0": 22.0, "block.1": 17.5, "head": 25.0},
        },
        "prune-toy": {
            "report": "prune-toy", "command": "prune", "model": parent, "out": "/models/toy-pruned.pth",
            "method": "channels", "amount": 0.3,
            "recipe": {"step": "prune", "method": "channels", "amount": 0.3, "criterion": "l1", "finetune_epochs": 2},
            "before": {"params": 1_000_000, "macs": 50_000_000, "bytes": 4_000_000, "latency": _latency(21.0),
                       "eval": _eval(0.80)},
            "pruned": {"params": 700_000, "macs": 35_000_000, "bytes": 2_800_000, "latency": _latency(15.0),
                       "eval": _eval(0.70)},
            "finetuned": _eval(0.78),
            "finetune_history": [{"epoch": 1, "regression_loss": 1.0, "classification_loss": 2.0, "seconds": 3.0},
                                 {"epoch": 2, "regression_loss": 0.8, "classification_loss": 1.7, "seconds": 3.0}],
        },
        "bench-toy": {
            "report": "bench-toy", "command": "bench", "config": {"threads": 1},
            "models": [
                {"label": "toy-pruned", "path": "/models/toy-pruned.pth", "model": pruned_model, "quantized": False,
                 "file_bytes": 2_800_000, "params": 700_000, "macs": 35_000_000, "bops": 35_840_000_000,
                 "latency": {"1": _latency(14.0)}},
                {"label": "toy-int8", "path": "/models/toy-int8.pth", "quantized": True, "file_bytes": 1_100_000,
                 "model": _summary("/models/toy-int8.pth", INT8_SHA, RECIPE, [{"step": "quantize", **RECIPE}]),
                 "params": 1_000_000, "macs": 50_000_000, "bops": 3_200_000_000, "latency": {"1": _latency(7.5)}},
            ],
        },
        # A quantized copy of the pruned model: grouped under the first parent through the pruned file.
        "quantize-toy-pruned": {
            "report": "quantize-toy-pruned", "command": "quantize", "model": pruned_model,
            "out": "/models/toy-pruned-int8.pth", "recipe": RECIPE, "fp32": _eval(0.78), "int8": _eval(0.775),
            "fp32_latency": _latency(15.0), "int8_latency": _latency(6.0), "fp32_bytes": 2_800_000,
            "int8_bytes": 800_000, "layer_sqnr_db": {"conv1": 29.0, "head": 21.0},
        },
        "qat-toy": {
            "report": "qat-toy", "command": "qat", "model": parent, "out": "/models/toy-qat.pth", "method": "int8",
            "data": {"pseudo_labels": None}, "recipe": {**RECIPE, "qat": True, "epochs": 2},
            "fp32": _eval(0.80), "ptq": _eval(0.79), "qat": _eval(0.795),
            "steps": [{"step": "fp32", "description": "float model", "mAP": 0.80, "gbops": 51.2, "file_bytes": 4_000_000},
                      {"step": "ptq-int8", "description": "post-training int8", "mAP": 0.79, "gbops": 3.2,
                       "file_bytes": None},
                      {"step": "qat-int8", "description": "QAT int8", "mAP": 0.795, "gbops": 3.2,
                       "file_bytes": 1_100_000}],
            "history": [{"epoch": 1, "regression_loss": 0.5, "classification_loss": 1.5},
                        {"epoch": 2, "regression_loss": 0.45, "classification_loss": 1.4}],
            "latency": {"fp32": _latency(20.0), "output": _latency(8.5), "runtime": "torch eager int8 (x86)"},
        },
        "recipes-toy": {
            "report": "recipes-toy", "command": "quantize --recipe-table", "model": parent, "metric": "voc07",
            "fp32": 0.80, "recipes": [{"name": "naive per-tensor", "score": 0.70, "relative": 0.875},
                                      {"name": "+ CLE", "score": 0.76, "relative": 0.95},
                                      {"name": "per-channel", "score": 0.79, "relative": 0.9875}],
        },
        "prune-sensitivity-toy": {
            "report": "prune-sensitivity-toy", "command": "prune --sensitivity", "model": parent,
            "method": "channels", "baseline_mAP": 0.80, "amounts": [0.25, 0.5],
            "drops": {"block.0": {"0.25": 0.01, "0.5": 0.05}, "block.1": {"0.25": 0.002, "0.5": 0.02}},
        },
        "compare-toy": {
            "report": "compare-toy", "command": "compare", "config": {"threads": 1, "data": {}},
            "models": [
                {"label": "toy", "path": "/models/toy.pth", "model": parent, "file_bytes": 4_000_000,
                 "params": 1_000_000, "macs": 50_000_000, "bops": 51_200_000_000, "latency": {"1": _latency(19.0)},
                 "accuracy": _eval(0.80)},
                {"label": "toy-int8", "path": "/models/toy-int8.pth", "quantized": True, "file_bytes": 1_100_000,
                 "model": _summary("/models/toy-int8.pth", INT8_SHA, RECIPE), "params": 1_000_000,
                 "macs": 50_000_000, "bops": 3_200_000_000, "latency": {"1": _latency(7.0)},
                 "accuracy": _eval(0.79)},
            ],
            "gallery": [{"image_id": "000001", "file": "compare-toy_images/01-000001.jpg"},
                        {"image_id": "000002", "file": "compare-toy_images/02-missing.jpg"}],
        },
        "eval-toy": {"report": "eval-toy", "command": "eval", "model": parent, "metric": "coco", "mAP": None,
                     "fidelity": {"AP50": 0.97}, "data": {"pseudo_labels": None}},
        "export-toy": {"report": "export-toy", "command": "export", "model": parent,
                       "export": {"path": "/models/toy.onnx", "precision": "float32", "size_bytes": 3_900_000,
                                  "sqnr_db": [80.0, "inf"]}},
        "train-toy": {"report": "train-toy", "command": "train", "out": "/models/toy.pth",
                      "history": [{"epoch": 1, "regression_loss": 2.0, "classification_loss": 4.0, "val_mAP": 0.3},
                                  {"epoch": 2, "regression_loss": 1.5, "classification_loss": 3.0, "val_mAP": 0.5}]},
    }


SKIPPED = {
    "broken.json": '{"report": "broken", "command": "quantize", ',  # cut off mid-write
    "old-no-command.json": json.dumps({"report": "old-no-command", "mAP": 0.5}),  # before reports had "command"
    "old-quantize.json": json.dumps({"report": "old-quantize", "command": "quantize", "created": "2020-01-01"}),
    "a-list.json": "[1, 2, 3]",
    "future.json": json.dumps({"report": "future", "command": "distill", "model": {}}),
    "toy-amounts.json": json.dumps({"block.0": 0.25}),  # prune --sensitivity's amounts file
    "odd-shapes.json": json.dumps({"report": "odd-shapes", "command": "bench", "models": "not a list"}),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_results")
    for name, data in _reports().items():
        (root / f"{name}.json").write_text(json.dumps(data))
        (root / f"{name}.md").write_text(f"# {name}\n")
    # Written by an old version: NaN where newer versions write null, a model summary without sha256.
    (root / "quantize-nan.json").write_text(
        '{"report": "quantize-nan", "command": "quantize", "model": {"path": "/old/m.pth"}, '
        '"fp32": {"metric": "coco", "mAP": NaN}, "int8": {"metric": "coco", "mAP": NaN}, '
        '"fidelity": {"AP50": 0.95}, "fp32_latency": {"median_ms": 9.0, "threads": 1}, '
        '"int8_latency": {"median_ms": 4.0, "threads": 1}, "fp32_bytes": 1000, "int8_bytes": 400}')
    for name, text in SKIPPED.items():
        (root / name).write_text(text)
    gallery = root / "compare-toy_images"
    gallery.mkdir()
    Image.new("RGB", (48, 32), (200, 30, 30)).save(gallery / "01-000001.jpg")
    return root


@pytest.fixture(scope="module")
def built(folder: Path):
    result, second = report(ReportConfig(dir=folder))
    assert second is None
    return result, result.out.read_text(encoding="utf-8")


class _Page(HTMLParser):
    """Text, <img> attributes, ids, links and JSON script blocks of a page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text: list[str] = []
        self.images: list[dict[str, str]] = []
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.skipped_items: list[str] = []
        self.json_blocks: list[str] = []
        self._in_skipped = self._in_li = self._in_json = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs)
        elif tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        elif tag == "ul" and attrs.get("id") == "skipped-list":
            self._in_skipped = True
        elif tag == "li" and self._in_skipped:
            self._in_li = True
            self.skipped_items.append("")
        elif tag == "script" and attrs.get("type") == "application/json":
            self._in_json = True
            self.json_blocks.append("")

    def handle_endtag(self, tag):
        if tag == "ul":
            self._in_skipped = False
        elif tag == "li":
            self._in_li = False
        elif tag == "script":
            self._in_json = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_li:
            self.skipped_items[-1] += data
        if self._in_json:
            self.json_blocks[-1] += data

    @property
    def all_text(self) -> str:
        return " ".join(self.text)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    return width, height


def _charts(page: _Page) -> list[bytes]:
    prefix = "data:image/png;base64,"
    return [base64.b64decode(img["src"][len(prefix):], validate=True) for img in page.images
            if img.get("class") == "chart" and img.get("src", "").startswith(prefix)]


# --------------------------------------------------------------------------------------- the page
def test_every_report_appears_and_every_other_json_is_skipped_with_a_reason(built, folder):
    result, text = built
    page = _Page(text)
    valid = sorted([*_reports(), "quantize-nan"])
    assert sorted(Path(r).stem for r in result.reports) == valid
    for name in valid:
        assert name in page.all_text, name
    assert sorted(line.split(":", 1)[0] for line in page.skipped_items) == sorted(SKIPPED)
    assert page.skipped_items == result.skipped
    assert all(len(line.split(": ", 1)[1]) > 10 for line in result.skipped)  # a reason, not just a name
    reasons = dict(line.split(": ", 1) for line in result.skipped)
    assert "not valid JSON" in reasons["broken.json"]
    assert "older qcompress" in reasons["old-no-command.json"]
    assert "older qcompress" in reasons["old-quantize.json"]
    assert "unknown command 'distill'" in reasons["future.json"]
    # Every JSON file in the folder is accounted for: read, or skipped with its line.
    assert len(result.reports) + len(result.skipped) == len(list(folder.glob("*.json")))


def test_charts_are_embedded_non_empty_pngs(built):
    result, text = built
    page = _Page(text)
    charts = _charts(page)
    # 2 trade-off (the toy group's mAP; the old report's own group, fidelity), 2 SQNR, QAT steps, recipes,
    # sensitivity, 3 training histories (prune fine-tuning, QAT, train)
    assert len(charts) == result.charts == 10
    for data in charts:
        width, height = _png_size(data)
        assert width >= 200 and height >= 150
        assert len(data) > 5_000
        image = Image.open(io.BytesIO(data))
        image.load()
        assert sum(1 for count in image.convert("L").histogram() if count) > 8  # drawn on, not blank
    assert all(img.get("alt") for img in page.images)
    assert "http://" not in text and "https://" not in text  # nothing is fetched when the page opens


def test_zoo_groups_variants_by_parent_checkpoint(folder):
    entries, _ = read_folder(folder)
    groups = {g.key: g for g in group_variants(entries)}
    toy = groups[PARENT_SHA]
    names = {v.name for v in toy.variants}
    # The int8 file measured by bench/compare is the one quantize wrote; the pruned file's quantized copy
    # descends from the pruned model, so from the same fp32 parent.
    assert {"toy", "toy-int8", "toy-pruned", "toy-pruned-int8", "toy-qat", "toy.onnx"} <= names
    assert INT8_SHA not in groups and PRUNED_SHA not in groups
    assert toy.parent_name == "toy"
    int8 = next(v for v in toy.variants if v.name == "toy-int8" and v.command == "quantize")
    assert int8.latency_ms == {"torch eager, 1 thread": 8.0}  # the refused ONNX export is no number
    parent = next(v for v in toy.variants if v.role == "parent" and v.command == "quantize")
    assert parent.latency_ms == {"torch eager, 1 thread": 20.0, "onnxruntime, 1 thread": 12.0}
    assert "int8 x86" in int8.recipe and "per-channel" in int8.recipe
    pruned = next(v for v in toy.variants if v.name == "toy-pruned" and v.command == "prune")
    assert pruned.accuracy == 0.78 and pruned.params == 700_000  # the fine-tuned score
    evaluated = next(v for v in toy.variants if v.command == "eval")
    assert evaluated.accuracy == 0.97 and evaluated.accuracy_kind == FIDELITY
    old = next(v for g in groups.values() for v in g.variants if v.report == "quantize-nan" and v.role == "variant")
    assert old.accuracy == 0.95 and old.accuracy_kind == FIDELITY


def test_zoo_table_shows_latency_per_runtime_and_thread_count(built):
    _, text = built
    assert "latency ms (torch eager, 1 thread)" in text
    assert "latency ms (onnxruntime, 1 thread)" in text
    assert PARENT_SHA[:12] in text


def test_gallery_pictures_are_embedded_and_a_missing_one_is_noted(built):
    result, text = built
    page = _Page(text)
    gallery = [img for img in page.images if img.get("class") == "gallery"]
    assert len(gallery) == 1 and gallery[0]["src"].startswith("data:image/jpeg;base64,")
    assert base64.b64decode(gallery[0]["src"].split(",", 1)[1])[:2] == b"\xff\xd8"
    assert result.images_embedded == 1 and result.missing_images == ["compare-toy_images/02-missing.jpg"]
    assert "compare-toy_images/01-000001.jpg" in page.links  # relative link beside the embedded picture


def test_page_data_block_is_strict_json(built):
    _, text = built
    page = _Page(text)
    assert len(page.json_blocks) == 1

    def refuse(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    data = json.loads(page.json_blocks[0], parse_constant=refuse)
    assert {r["name"] for r in data["reports"]} >= set(_reports())
    assert len(data["skipped"]) == len(SKIPPED)


def test_tables_only_when_matplotlib_cannot_be_imported(folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result, _ = report(ReportConfig(dir=folder, out=tmp_path / "tables.html"))
    page = _Page(result.out.read_text(encoding="utf-8"))
    assert result.charts == 0 and result.charts_unavailable and "matplotlib" in result.charts_unavailable
    assert _charts(page) == []
    assert "no-charts" in page.ids
    assert "conv1" in page.all_text and "naive per-tensor" in page.all_text  # the numbers, as tables
    for name in _reports():
        assert name in page.all_text


def test_pareto_front_on_hand_made_points():
    points = [
        (10.0, 0.80),  # 0: fastest of the accurate ones: front
        (5.0, 0.70),   # 1: fastest: front
        (20.0, 0.85),  # 2: most accurate: front
        (12.0, 0.79),  # 3: slower and worse than 0: dominated
        (20.0, 0.84),  # 4: as slow as 2, worse: dominated
        (5.0, 0.70),   # 5: equal to 1: kept (neither beats the other)
        (30.0, 0.85),  # 6: as accurate as 2, slower: dominated
        (7.0, 0.75),   # 7: between 1 and 0: front
    ]
    assert pareto_front(points) == [1, 5, 7, 0, 2]
    assert pareto_front([]) == []
    assert pareto_front([(3.0, 0.5)]) == [0]
    assert pareto_front([(1.0, 0.9), (2.0, 0.8), (3.0, 0.7)]) == [0]


def test_real_reports_folder_all_appear():
    """The committed reports, read as `qcompress report` reads them (tables only, to stay fast)."""
    folder = Path(__file__).resolve().parents[2] / "eval_results"
    files = sorted(folder.glob("*.json"))
    if not files:
        pytest.skip("no committed reports in eval_results/")
    from qcompress.reports.html import build_page

    entries, skipped = read_folder(folder)
    page = _Page(build_page(entries, skipped, title="t", source_dir=folder, out_path=folder / "index.html",
                            charts=False).html)
    for path in files:
        assert path.stem in page.all_text, path.name  # in the reports table, or its line in the skipped list


def test_cli_prints_the_page_path_and_refuses_a_missing_folder(tmp_path):
    from qcompress.cli.app import app

    folder = tmp_path / "reports"
    folder.mkdir()
    (folder / "eval-toy.json").write_text(json.dumps(_reports()["eval-toy"]))  # a table, no chart: fast
    runner = CliRunner()
    result = runner.invoke(app, ["report", "--dir", str(folder)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(folder / "index.html")
    assert "eval-toy" in (folder / "index.html").read_text(encoding="utf-8")
    missing = runner.invoke(app, ["report", "--dir", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "not found" in missing.output
    wrong = runner.invoke(app, ["report", "--dir", str(folder), "--out", str(tmp_path / "page.txt")])
    assert wrong.exit_code == 2 and ".html" in wrong.output


# ---------------------------------------------------------------------------------- real browser
CHROMIUM = "/usr/bin/chromium"


def test_page_renders_in_headless_chromium(built, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium not installed: apt-get install chromium")
    result, _ = built
    shot = tmp_path / "page.png"
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
              f"--user-data-dir={tmp_path / 'profile'}"]
    url = result.out.resolve().as_uri()
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,2000", url], check=True, timeout=120,
                   capture_output=True)
    with Image.open(shot) as image:
        assert image.size == (1280, 2000)
        assert sum(1 for count in image.convert("L").histogram() if count) > 16  # text and charts, not blank
    dom = subprocess.run([*common, "--dump-dom", url], check=True, timeout=120, capture_output=True, text=True).stdout
    rendered = _Page(dom)
    assert len(_charts(rendered)) == result.charts
    for name in _reports():
        assert name in rendered.all_text
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
