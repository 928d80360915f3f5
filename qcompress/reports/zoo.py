"""The reports in a folder, read as a model zoo: every variant a command measured, grouped by the parent
checkpoint it was made from, plus the per-layer, per-step and per-epoch numbers the page draws.

Reports come from every version of qcompress, so nothing here trusts a key to exist or to hold the
type it holds today: a report that yields nothing this page can show is *skipped* with one line saying
why, never an exception.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FIDELITY = "fidelity AP50 vs fp32"
UNKNOWN_PARENT = "unknown"
# Commands whose JSON is not a measurement of a model (this page's own data, should it ever be written).
_IGNORED_COMMANDS = ("report",)


# ------------------------------------------------------------------------------------- the records
@dataclass
class Variant:
    """One model as one report measured it. ``role`` is ``parent`` (the float checkpoint a command
    started from), ``variant`` (what a command made) or ``model`` (a checkpoint measured as given)."""

    name: str
    report: str
    command: str
    role: str
    path: str | None = None
    sha256: str | None = None
    parent_sha256: str | None = None
    parent_name: str | None = None
    recipe: str = ""
    accuracy: float | None = None
    accuracy_kind: str | None = None  # "mAP (voc07)", "mAP (coco)" or FIDELITY
    latency_ms: dict[str, float] = field(default_factory=dict)  # "runtime, N threads" -> median ms, batch 1
    size_bytes: int | None = None
    params: int | None = None
    macs: int | None = None
    bops: int | None = None
    quantized: bool = False

    @property
    def group(self) -> str:
        """The key variants are grouped by: the parent checkpoint's sha256."""
        return self.parent_sha256 or self.sha256 or UNKNOWN_PARENT

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"group": self.group}


@dataclass
class Step:
    """One row of a step table (a QAT step, a quantization recipe): its name and what it scored."""

    name: str
    accuracy: float | None
    gbops: float | None = None
    note: str = ""


@dataclass
class Sensitivity:
    """``prune --sensitivity``: accuracy drop when each target alone is pruned by each amount."""

    amounts: list[float]
    drops: dict[str, list[float | None]]  # target -> drop per amount
    baseline: float | None = None


@dataclass
class GalleryImage:
    image_id: str
    file: str  # relative to the report's folder, as the report wrote it


@dataclass
class Entry:
    """One report file that was read, and everything the page takes from it."""

    file: str
    name: str
    command: str
    created: str | None = None
    accuracy_kind: str | None = None
    variants: list[Variant] = field(default_factory=list)
    layer_sqnr_db: dict[str, float] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    steps_reference: float | None = None  # the fp32 score a step table is measured against
    sensitivity: Sensitivity | None = None
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: numeric fields only
    gallery: list[GalleryImage] = field(default_factory=list)

    def shows_something(self) -> bool:
        return bool(self.variants or self.layer_sqnr_db or self.steps or self.sensitivity or self.history
                    or self.gallery)


@dataclass
class Group:
    """The variants made from one parent checkpoint."""

    key: str  # parent sha256, or UNKNOWN_PARENT
    parent_name: str
    variants: list[Variant]


# ---------------------------------------------------------------------------------- safe accessors
def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _num(value: Any) -> float | None:
    """A finite number, else None (old reports hold bare NaN, new ones null; strings are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _int(value: Any) -> int | None:
    number = _num(value)
    return int(number) if number is not None else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _stem(path: Any) -> str | None:
    text = _str(path)
    return Path(text).stem if text else None


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def latency_key(runtime: str, threads: Any) -> str:
    """``"torch eager, 1 thread"``: latencies are comparable only under one runtime and thread count."""
    count = _int(threads)
    return f"{runtime}, {_plural(count, 'thread') if count is not None else 'default threads'}"


def _add_latency(target: dict[str, float], stats: Any, runtime: str = "torch eager") -> None:
    """A LatencyStats dict (or what an ONNX Runtime measurement wrote instead: a refusal string, None)."""
    stats = _dict(stats)
    median = _num(stats.get("median_ms"))
    if median is None or (_int(stats.get("batch_size")) or 1) != 1:
        return
    name = _str(stats.get("runtime"))
    if name:  # "onnxruntime 1.20.1": the version would split one runtime into many columns
        runtime = name.split()[0]
    threads = stats.get("intra_op_threads", stats.get("threads"))
    target[latency_key(runtime, threads)] = median


# ------------------------------------------------------------------------------------ descriptions
def _accuracy_kind(metric: Any, pseudo_labels: Any = None) -> str | None:
    metric = _str(metric)
    if metric is None:
        return None
    if metric.startswith("fidelity") or _num(pseudo_labels) is not None:
        return FIDELITY
    return f"mAP ({metric})"


def _eval_score(result: Any, pseudo_labels: Any = None) -> tuple[float | None, str | None]:
    """(score, kind) of an EvalResult dict: mAP where the data has labels, else fidelity AP50."""
    result = _dict(result)
    kind = _accuracy_kind(result.get("metric"), pseudo_labels)
    value = _num(result.get("mAP"))
    if value is not None:
        return value, kind
    fidelity = _dict(result.get("fidelity")) or _dict(_dict(result.get("extra")).get("fidelity"))
    if _num(fidelity.get("AP50")) is not None:
        return _num(fidelity.get("AP50")), FIDELITY
    return None, kind


def describe_quantization(recipe: Any) -> str:
    """``"int8 x86, histogram, per-channel, CLE"``: the recipe fields that change the result."""
    recipe = _dict(recipe)
    if not recipe:
        return ""
    scheme = _str(recipe.get("scheme")) or "quantized"
    if scheme.startswith("lowbit") or recipe.get("bits_w") is not None and not scheme.startswith("int8"):
        parts = [f"{recipe.get('method') or 'low-bit'} w{recipe.get('bits_w')}a{recipe.get('bits_a')}"]
        if recipe.get("scope"):
            parts.append(f"scope {recipe['scope']}")
    else:
        parts = ["int8" + (f" {recipe['backend']}" if _str(recipe.get("backend")) else "")]
        if _str(recipe.get("observer")):
            parts.append(recipe["observer"])
        if isinstance(recipe.get("per_channel"), bool):
            parts.append("per-channel" if recipe["per_channel"] else "per-tensor")
    if recipe.get("qat"):
        parts.append("QAT")
    if recipe.get("data_free"):
        parts.append("data-free")
    else:
        parts += [name for key, name in (("equalize", "CLE"), ("absorb_bias", "bias absorption")) if recipe.get(key)]
        if _str(recipe.get("bias_correction")):
            parts.append(f"bias correction {recipe['bias_correction']}")
    epochs = _int(recipe.get("epochs"))
    if epochs:
        parts.append(_plural(epochs, "epoch"))
    calib = _int(recipe.get("calib_images"))
    if calib:
        parts.append(f"calib {calib}")
    return ", ".join(parts)


def describe_pruning(recipe: Any) -> str:
    recipe = _dict(recipe)
    method, amount = _str(recipe.get("method")) or "pruned", _num(recipe.get("amount"))
    parts = [method + (f" {amount:g}" if amount is not None else "")]
    if _str(recipe.get("criterion")):
        parts.append(recipe["criterion"])
    if _dict(recipe.get("amounts")):
        parts.append("per-layer amounts")
    epochs = _int(recipe.get("finetune_epochs"))
    if epochs:
        parts.append(f"fine-tuned {_plural(epochs, 'epoch')}")
    return ", ".join(parts)


def describe_model(summary: Any) -> str:
    """What a checkpoint is, from its sidecar as the report's model summary copied it."""
    summary = _dict(summary)
    steps = [_dict(s) for s in _list(summary.get("compression"))]
    made = [s for s in steps if s.get("step") not in (None, "train")]
    if not made and not _dict(summary.get("quantization")):
        return "float32"
    parts = []
    for step in made:
        if step.get("step") == "prune":
            parts.append("pruned " + describe_pruning(step))
        elif step.get("step") in ("quantize", "qat"):
            parts.append(describe_quantization(step))
        else:
            parts.append(str(step.get("step")))
    if not parts:
        parts.append(describe_quantization(summary.get("quantization")))
    return " -> ".join(p for p in parts if p)


def _is_float(summary: Any) -> bool:
    return describe_model(summary) == "float32"


# -------------------------------------------------------------------------------- one per command
def _parent(data: dict[str, Any], entry: Entry, **fields: Any) -> Variant:
    model = _dict(data.get("model"))
    name = _stem(model.get("path")) or "parent"
    return Variant(name=name, report=entry.name, command=entry.command, role="parent", path=_str(model.get("path")),
                   sha256=_str(model.get("sha256")), parent_sha256=_str(model.get("sha256")), parent_name=name,
                   recipe=describe_model(model), **fields)


def _child(data: dict[str, Any], entry: Entry, name: str | None, **fields: Any) -> Variant:
    model = _dict(data.get("model"))
    parent = _stem(model.get("path"))
    return Variant(name=name or f"{parent or 'model'} ({entry.command})", report=entry.name, command=entry.command,
                   role="variant", path=_str(data.get("out")), parent_sha256=_str(model.get("sha256")),
                   parent_name=parent, **fields)


def _read_quantize(data: dict[str, Any], entry: Entry) -> None:
    fidelity = _dict(data.get("fidelity"))
    fp32_score, kind = _eval_score(data.get("fp32"))
    int8_score, _ = _eval_score(data.get("int8"))
    if _num(fidelity.get("AP50")) is not None and (int8_score is None or fp32_score is None):
        fp32_score, int8_score, kind = 1.0, _num(fidelity.get("AP50")), FIDELITY  # the parent is its own reference
    entry.accuracy_kind = kind
    parent_latency: dict[str, float] = {}
    child_latency: dict[str, float] = {}
    _add_latency(parent_latency, data.get("fp32_latency"))
    _add_latency(parent_latency, data.get("ort_fp32_latency"), "onnxruntime")
    _add_latency(child_latency, data.get("int8_latency"))
    _add_latency(child_latency, data.get("ort_int8_latency"), "onnxruntime")
    if data.get("fp32") is not None or parent_latency or _int(data.get("fp32_bytes")):
        entry.variants.append(_parent(data, entry, accuracy=fp32_score, accuracy_kind=kind,
                                      latency_ms=parent_latency, size_bytes=_int(data.get("fp32_bytes"))))
    if data.get("int8") is not None or child_latency or _int(data.get("int8_bytes")) or _str(data.get("out")):
        entry.variants.append(_child(data, entry, _stem(data.get("out")), recipe=describe_quantization(data.get("recipe")),
                                     accuracy=int8_score, accuracy_kind=kind, latency_ms=child_latency,
                                     size_bytes=_int(data.get("int8_bytes")), quantized=True))
    entry.layer_sqnr_db = {str(k): v for k, v in _dict(data.get("layer_sqnr_db")).items() if _num(v) is not None}


def _read_recipe_table(data: dict[str, Any], entry: Entry) -> None:
    entry.accuracy_kind = _accuracy_kind(data.get("metric"))
    entry.steps_reference = _num(data.get("fp32"))
    for row in _list(data.get("recipes")):
        row = _dict(row)
        if _str(row.get("name")):
            entry.steps.append(Step(row["name"], _num(row.get("score"))))


def _prune_stats(stats: Any, kind_hint: Any) -> dict[str, Any]:
    stats = _dict(stats)
    latency: dict[str, float] = {}
    _add_latency(latency, stats.get("latency"))
    score, kind = _eval_score(stats.get("eval"), kind_hint)
    return {"accuracy": score, "accuracy_kind": kind, "latency_ms": latency, "size_bytes": _int(stats.get("bytes")),
            "params": _int(stats.get("params")), "macs": _int(stats.get("macs"))}


def _read_prune(data: dict[str, Any], entry: Entry) -> None:
    pseudo = _dict(data.get("data")).get("pseudo_labels")
    before, after = _dict(data.get("before")), _dict(data.get("pruned"))
    if before:
        parent = _prune_stats(before, pseudo)
        _add_latency(parent["latency_ms"], data.get("ort_parent_latency"), "onnxruntime")
        entry.variants.append(_parent(data, entry, **parent))
        entry.accuracy_kind = parent["accuracy_kind"]
    if after:
        child = _prune_stats(after, pseudo)
        _add_latency(child["latency_ms"], data.get("ort_pruned_latency"), "onnxruntime")
        finetuned, kind = _eval_score(data.get("finetuned"), pseudo)
        if finetuned is not None:
            child.update(accuracy=finetuned, accuracy_kind=kind)
        recipe = _dict(data.get("recipe")) or {"method": data.get("method"), "amount": data.get("amount")}
        entry.variants.append(_child(data, entry, _stem(data.get("out")), recipe=describe_pruning(recipe), **child))
    entry.history = _history(data.get("finetune_history"))


def _read_sensitivity(data: dict[str, Any], entry: Entry) -> None:
    amounts = [a for a in (_num(v) for v in _list(data.get("amounts"))) if a is not None]
    drops = _dict(data.get("drops"))
    if not amounts or not drops:
        return
    table = {}
    for target, row in drops.items():
        row = _dict(row)
        table[str(target)] = [_num(row.get(str(a), row.get(f"{a:g}"))) for a in amounts]
    entry.sensitivity = Sensitivity(amounts, table, _num(data.get("baseline_mAP")))
    entry.accuracy_kind = "mAP"


def _read_qat(data: dict[str, Any], entry: Entry) -> None:
    pseudo = _dict(data.get("data")).get("pseudo_labels")
    steps = [_dict(s) for s in _list(data.get("steps"))]
    latency = _dict(data.get("latency"))
    parent_latency: dict[str, float] = {}
    child_latency: dict[str, float] = {}
    _add_latency(parent_latency, latency.get("fp32"))
    runtime = _str(latency.get("runtime")) or "torch eager"
    # Fake-quantized low-bit models run in float: their latency is not a low-bit kernel's, say so.
    _add_latency(child_latency, latency.get("output"), "torch eager" if "int8" in runtime else "torch eager (float)")
    fp32_score, kind = _eval_score(data.get("fp32"), pseudo)
    entry.accuracy_kind = kind
    by_step = {str(s.get("step")): s for s in steps}
    first, last = (steps[0] if steps else {}), (steps[-1] if steps else {})
    gbops = _num(first.get("gbops"))
    if data.get("fp32") is not None or parent_latency:
        entry.variants.append(_parent(data, entry, accuracy=fp32_score, accuracy_kind=kind, latency_ms=parent_latency,
                                      size_bytes=_int(first.get("file_bytes")),
                                      bops=int(gbops * 1e9) if gbops is not None else None))
    ptq_score, _ = _eval_score(data.get("ptq"), pseudo)
    ptq_step = next((s for name, s in by_step.items() if name.startswith("ptq")), {})
    if ptq_score is not None:
        gbops = _num(ptq_step.get("gbops"))
        entry.variants.append(_child(data, entry, f"{_stem(_dict(data.get('model')).get('path')) or 'model'} PTQ int8",
                                     recipe=_str(ptq_step.get("description")) or "post-training int8",
                                     accuracy=ptq_score, accuracy_kind=kind, quantized=True,
                                     bops=int(gbops * 1e9) if gbops is not None else None))
        entry.variants[-1].path = None  # not saved: the baseline is measured, not written
    qat_score, _ = _eval_score(data.get("qat"), pseudo)
    if qat_score is not None or child_latency:
        gbops = _num(last.get("gbops"))
        recipe = describe_quantization(data.get("recipe")) or f"QAT {data.get('method')}"
        entry.variants.append(_child(data, entry, _stem(data.get("out")), recipe=recipe, accuracy=qat_score,
                                     accuracy_kind=kind, latency_ms=child_latency, quantized=True,
                                     size_bytes=_int(last.get("file_bytes")),
                                     bops=int(gbops * 1e9) if gbops is not None else None))
    for step in steps:
        if _str(step.get("step")):
            entry.steps.append(Step(step["step"], _num(step.get("mAP")), _num(step.get("gbops")),
                                    _str(step.get("description")) or ""))
    entry.steps_reference = fp32_score
    entry.history = _history(data.get("history"))


def _model_variants(data: dict[str, Any], entry: Entry, models: Iterable[Any], accuracy: Callable[[dict], Any]) -> None:
    config = _dict(data.get("config"))
    runtime_option = _str(config.get("runtime"))
    for model in models:
        model = _dict(model)
        summary = _dict(model.get("model"))
        path = _str(model.get("path")) or _str(summary.get("path"))
        runtime = runtime_option or ("onnxruntime" if (path or "").lower().endswith(".onnx") else "torch eager")
        latency: dict[str, float] = {}
        for stats in _dict(model.get("latency")).values():
            _add_latency(latency, stats, runtime)
        score, kind = accuracy(model)
        float_model = _is_float(summary)
        entry.variants.append(Variant(
            name=_str(model.get("label")) or _stem(path) or "model", report=entry.name, command=entry.command,
            role="model", path=path, sha256=_str(summary.get("sha256")),
            parent_sha256=_str(summary.get("sha256")) if float_model else None, recipe=describe_model(summary),
            accuracy=score, accuracy_kind=kind, latency_ms=latency, size_bytes=_int(model.get("file_bytes")),
            params=_int(model.get("params")), macs=_int(model.get("macs")), bops=_int(model.get("bops")),
            quantized=bool(model.get("quantized")) or bool(_dict(summary.get("quantization")))))


def _read_bench(data: dict[str, Any], entry: Entry) -> None:
    _model_variants(data, entry, _list(data.get("models")), lambda model: (None, None))


def _read_compare(data: dict[str, Any], entry: Entry) -> None:
    pseudo = _dict(_dict(data.get("config")).get("data")).get("pseudo_labels")
    _model_variants(data, entry, _list(data.get("models")), lambda model: _eval_score(model.get("accuracy"), pseudo))
    entry.accuracy_kind = next((v.accuracy_kind for v in entry.variants if v.accuracy_kind), None)
    for image in _list(data.get("gallery")):
        image = _dict(image)
        if _str(image.get("file")):
            entry.gallery.append(GalleryImage(str(image.get("image_id", "")), image["file"]))


def _read_eval(data: dict[str, Any], entry: Entry) -> None:
    model = _dict(data.get("model"))
    score, kind = _eval_score(data, _dict(data.get("data")).get("pseudo_labels"))
    if score is None and kind is None:
        return
    entry.accuracy_kind = kind
    float_model = _is_float(model)
    entry.variants.append(Variant(
        name=_stem(model.get("path")) or "model", report=entry.name, command=entry.command,
        role="parent" if float_model else "model", path=_str(model.get("path")), sha256=_str(model.get("sha256")),
        parent_sha256=_str(model.get("sha256")) if float_model else None, recipe=describe_model(model),
        accuracy=score, accuracy_kind=kind, quantized=bool(_dict(model.get("quantization")))))


def _read_export(data: dict[str, Any], entry: Entry) -> None:
    record = _dict(data.get("export"))
    if not record:
        return
    sqnr = [v for v in (_num(x) for x in _list(record.get("sqnr_db"))) if v is not None]
    recipe = f"ONNX {record.get('precision') or ''}".strip()
    if sqnr:
        recipe += f", output SQNR {min(sqnr):.1f} dB"
    variant = _child(data, entry, (_stem(record.get("path")) or "model") + ".onnx", recipe=recipe,
                     size_bytes=_int(record.get("size_bytes")), quantized=record.get("precision") == "int8")
    variant.path = _str(record.get("path"))
    entry.variants.append(variant)


def _read_train(data: dict[str, Any], entry: Entry) -> None:
    entry.history = _history(data.get("history"))


def _history(rows: Any) -> list[dict[str, float]]:
    out = []
    for row in _list(rows):
        numbers = {str(k): _num(v) for k, v in _dict(row).items()}
        numbers = {k: v for k, v in numbers.items() if v is not None}
        if "epoch" in numbers and len(numbers) > 1:
            out.append(numbers)
    return out


READERS: dict[str, Callable[[dict[str, Any], Entry], None]] = {
    "eval": _read_eval,
    "quantize": _read_quantize,
    "quantize --recipe-table": _read_recipe_table,
    "prune": _read_prune,
    "prune --sensitivity": _read_sensitivity,
    "qat": _read_qat,
    "bench": _read_bench,
    "compare": _read_compare,
    "train": _read_train,
    "export": _read_export,
}


# ------------------------------------------------------------------------------------- the folder
def read_report(path: Path) -> Entry | str | None:
    """The report at ``path`` read into an Entry; a one-line reason when it cannot be shown; None for
    JSON this page ignores on purpose (its own data)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        return f"unreadable ({exc.__class__.__name__}: {exc})"
    except ValueError as exc:
        return f"not valid JSON ({exc})"
    if not isinstance(data, dict):
        return f"not a qcompress report (a JSON {type(data).__name__}, not an object)"
    if str(data.get("format", "")).startswith("qcompress-checkpoint"):
        return "a checkpoint sidecar, not a report"
    command = data.get("command")
    if not isinstance(command, str):
        if "report" in data:
            return "no 'command' key: written by an older qcompress; rerun the command to include it"
        return "not a qcompress report (no 'report' or 'command' key)"
    if command in _IGNORED_COMMANDS:
        return None
    reader = READERS.get(command)
    if reader is None:
        return f"unknown command {command!r}: not one this page reads (another qcompress version, or another tool)"
    entry = Entry(file=path.name, name=_str(data.get("report")) or path.stem, command=command,
                  created=_str(data.get("created")))
    try:
        reader(data, entry)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:  # shapes no version wrote
        return f"{command} report in an unexpected shape ({exc.__class__.__name__}: {exc})"
    if not entry.shows_something():
        return f"{command} report without the keys this page reads (written by an older qcompress?)"
    return entry


def read_folder(folder: Path, advance: Callable[[int], None] | None = None) -> tuple[list[Entry], list[str]]:
    """Every ``*.json`` in ``folder`` (not recursive), in name order: the entries read and one line per
    file skipped (``"name.json: reason"``)."""
    entries, skipped = [], []
    for path in sorted(Path(folder).glob("*.json")):
        found = read_report(path)
        if isinstance(found, Entry):
            entries.append(found)
        elif isinstance(found, str):
            skipped.append(f"{path.name}: {found}")
        if advance is not None:
            advance(1)
    link_parents(entries)
    return entries, skipped


def _norm(path: str | None) -> str | None:
    return os.path.normpath(path) if path else None


def _sidecar_parent(path: str | None) -> str | None:
    """``parent_sha256`` from the checkpoint sidecar beside ``path``, if that file is still on this disk."""
    if not path:
        return None
    sidecar = Path(path).with_suffix(".json")
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else None
    except (OSError, ValueError):
        return None
    return _str(data.get("parent_sha256")) if isinstance(data, dict) else None


def link_parents(entries: Sequence[Entry]) -> None:
    """Give every variant the sha256 of the float checkpoint it descends from, where it can be known:
    the report's model summary, the checkpoint sidecar on disk, or another report that wrote the file
    (``out``). Chains (pruned, then quantized) resolve to the first parent."""
    variants = [v for e in entries for v in e.variants]
    written_from = {_norm(v.path): v.parent_sha256 for v in variants
                    if v.role == "variant" and v.path and v.parent_sha256}
    for v in variants:
        if v.parent_sha256 is None:
            v.parent_sha256 = written_from.get(_norm(v.path)) or _sidecar_parent(v.path)
    parent_of = {v.sha256: v.parent_sha256 for v in variants
                 if v.sha256 and v.parent_sha256 and v.sha256 != v.parent_sha256}
    names = {v.sha256: v.name for v in variants if v.role == "parent" and v.sha256}
    for v in variants:
        seen = set()
        while v.parent_sha256 in parent_of and v.parent_sha256 not in seen:
            seen.add(v.parent_sha256)
            v.parent_sha256 = parent_of[v.parent_sha256]
        if v.role == "parent" and v.sha256 != v.parent_sha256:
            v.role = "model"  # the input of this command, itself made from the group's parent
        if v.parent_sha256 in names:
            v.parent_name = names[v.parent_sha256]


def group_variants(entries: Sequence[Entry]) -> list[Group]:
    """Variants grouped by parent sha256, groups in order of first appearance, unknown parents last."""
    groups: dict[str, list[Variant]] = {}
    for entry in entries:
        for variant in entry.variants:
            groups.setdefault(variant.group, []).append(variant)
    ordered = sorted(groups.items(), key=lambda kv: kv[0] == UNKNOWN_PARENT)
    out = []
    for key, members in ordered:
        parents = [v for v in members if v.role == "parent" and v.sha256 == key]
        name = (parents[0].name if parents else None) or next((v.parent_name for v in members if v.parent_name), None)
        out.append(Group(key, name or ("unknown parent" if key == UNKNOWN_PARENT else key[:12]), members))
    return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower x (latency, size) and higher y (accuracy) are
    better; a point is dominated when another is at least as good in both and better in one. Equal
    points are all kept. Returned in order of increasing x."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(ox <= x and oy >= y and (ox < x or oy > y) for j, (ox, oy) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def json_for_page(entries: Sequence[Entry], skipped: Sequence[str], groups: Sequence[Group]) -> dict[str, Any]:
    """What the page shows, as data (strict-JSON-safe values are the caller's to enforce)."""
    return {
        "reports": [{"file": e.file, "name": e.name, "command": e.command, "created": e.created} for e in entries],
        "skipped": list(skipped),
        "groups": [{"parent_sha256": g.key, "parent": g.parent_name, "variants": [v.as_dict() for v in g.variants]}
                   for g in groups],
    }


__all__ = [
    "FIDELITY",
    "UNKNOWN_PARENT",
    "Entry",
    "GalleryImage",
    "Group",
    "Sensitivity",
    "Step",
    "Variant",
    "describe_model",
    "describe_pruning",
    "describe_quantization",
    "group_variants",
    "json_for_page",
    "latency_key",
    "link_parents",
    "pareto_front",
    "read_folder",
    "read_report",
]
