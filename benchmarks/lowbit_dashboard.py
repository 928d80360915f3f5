"""The A/W dashboard of the low-bit detection sources (issue 21): FCOS / RetinaNet ResNet-18 FPN on the
generated dataset, fp32 structure variants and 2-bit / ternary / 4-bit rows, backbone-only vs all.

Every row is a CLI run (`qcompress train` or `qcompress qat`), resumable and recorded with its exact
command; the script only adds the glue the CLI has no verb for: building the from-scratch init
checkpoint with the builder options, and copying the trained base's backbone into the other structure
variants ("a backbone trained once initialises the others", as the source does). Each finished row
is evaluated once here on the same test images (one inference pass, COCO-style AP via pycocotools
and VOC07 mAP).

Rows (low-bit rows fine-tune from the base fp32 row with the same epochs and images):
  fp32 FCOS FPN-BN + Head-GN (base, trained from scratch) | fp32 FCOS plain FPN + Head-GN | fp32 FCOS
  FPN-BN + Head-BN | fp32 RetinaNet FPN-BN + Head-GN | fp32 base + the low-bit rows' extra epochs (control)
  | DoReFa 2/2 backbone | DoReFa 2/2 all | LQ-Net ternary W / 2-bit A backbone | same, all | LSQ 4/4 all.

Usage: python benchmarks/lowbit_dashboard.py [--jobs 2] [--work /tmp/qcompress-dashboard]
       python benchmarks/lowbit_dashboard.py --collect --work DIR   # table only, from finished rows
       python benchmarks/lowbit_dashboard.py --parent FCOS.pth --work DIR   # low-bit rows + control from a given parent
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

SIZE, WIDTH = 224, 64
BASE_OPTIONS = {"input_size": SIZE, "width": WIDTH, "fpn_bn": True, "head_norm": "gn"}


@dataclass(frozen=True)
class Row:
    name: str
    model: str  # the table's "Method" column (the detector)
    structure: str  # with ResNet-18: the table's "Model" column
    method: str  # "fp32" or the low-bit method label
    aw: str  # "A/W" as the source writes it
    kind: str  # "scratch" | "variant" | "finetune" | "qat"
    arch: str = "fcos_resnet18_fpn"
    options: dict = field(default_factory=dict)
    transfer: tuple[str, ...] = ()  # state_dict prefixes copied from the base row
    qat_args: tuple[str, ...] = ()
    comment: str = ""


ROWS = (
    Row("fcos-fp32", "FCOS", "FPN-BN, Head-GN", "fp32", "32/32", "scratch", options=BASE_OPTIONS,
        comment="trained from scratch; the parent of every low-bit row"),
    Row("fcos-fp32-plain-fpn", "FCOS", "FPN (no BN), Head-GN", "fp32", "32/32", "variant",
        options=BASE_OPTIONS | {"fpn_bn": False}, transfer=("",),
        comment="the base row's tensors (its FPN BNs dropped), then trained"),
    Row("fcos-fp32-head-bn", "FCOS", "FPN-BN, Head-BN (per level)", "fp32", "32/32", "variant",
        options=BASE_OPTIONS | {"head_norm": "bn"}, transfer=("",),
        comment="the base row's convs (per-level head BNs new), then trained"),
    Row("retinanet-fp32", "RetinaNet", "FPN-BN, Head-GN", "fp32", "32/32", "variant",
        arch="retinanet_resnet18_fpn", options=BASE_OPTIONS, transfer=("backbone.",),
        comment="body + FPN from the base row (head new), then trained"),
    Row("fcos-fp32-parent", "FCOS", "FPN-BN, Head-GN", "fp32", "32/32", "parent",
        comment="the base fine-tuned --parent-epochs on the low-bit rows' images and lr; their parent"),
    Row("fcos-fp32-more", "FCOS", "FPN-BN, Head-GN", "fp32", "32/32", "finetune",
        comment="control: the parent fine-tuned with the low-bit rows' epochs, images and lr"),
    Row("fcos-dorefa-w2a2-backbone", "FCOS", "FPN-BN, Head-GN", "DoReFa, Quantize-Backbone", "2/2", "qat",
        qat_args=("--method", "dorefa", "--bits-w", "2", "--bits-a", "2", "--scope", "backbone")),
    Row("fcos-dorefa-w2a2-backbone-teacher", "FCOS", "FPN-BN, Head-GN", "DoReFa, Quantize-Backbone", "2/2", "qat",
        qat_args=("--method", "dorefa", "--bits-w", "2", "--bits-a", "2", "--scope", "backbone", "--teacher", "parent"),
        comment="as the row above, with the fp32 parent as teacher (feature imitation at P3-P7, lambda 0.01)"),
    Row("fcos-dorefa-w2a2-all", "FCOS", "FPN-BN, Head-GN", "DoReFa, Quantize-All", "2/2", "qat",
        qat_args=("--method", "dorefa", "--bits-w", "2", "--bits-a", "2", "--scope", "all")),
    Row("fcos-lqnet-ternary-backbone", "FCOS", "FPN-BN, Head-GN", "LQ-Net, Quantize-Backbone", "2/ternary",
        "qat", qat_args=("--method", "lqnet-ternary", "--bits-a", "2", "--scope", "backbone")),
    Row("fcos-lqnet-ternary-all", "FCOS", "FPN-BN, Head-GN", "LQ-Net, Quantize-All", "2/ternary", "qat",
        qat_args=("--method", "lqnet-ternary", "--bits-a", "2", "--scope", "all")),
    Row("fcos-lsq-w4a4-all", "FCOS", "FPN-BN, Head-GN", "LSQ, Quantize-All", "4/4", "qat",
        qat_args=("--method", "lsq", "--bits-w", "4", "--bits-a", "4", "--scope", "all")),
)
BASE = ROWS[0]
PARENT = next(r for r in ROWS if r.kind == "parent")


def parent_row(args: argparse.Namespace) -> Row:
    """The fp32 row the low-bit rows and the control fine-tune from: the base, or with --parent-epochs the
    base trained further (a converged parent, as the source's low-bit models start from a trained model),
    or with --parent a checkpoint trained elsewhere."""
    return PARENT if args.parent_epochs or args.parent else BASE


def parent_path(args: argparse.Namespace) -> Path:
    return args.parent if args.parent else args.work / f"{parent_row(args).name}.pth"


def rows_for(args: argparse.Namespace) -> tuple[Row, ...]:
    if args.parent:  # a given parent: no base, so no structure variants either (they start from the base)
        return tuple(r for r in ROWS if r.kind in ("parent", "finetune", "qat"))
    return tuple(r for r in ROWS if r.kind != "parent" or args.parent_epochs)


def _settings(args: argparse.Namespace) -> dict:
    return {"base_epochs": args.base_epochs, "base_lr": args.base_lr, "variant_epochs": args.variant_epochs,
            "variant_lr": args.variant_lr, "epochs": args.epochs, "train_limit": args.train_limit,
            "lr": args.lr, "limit": args.limit, "seed": args.seed, "size": SIZE, "width": WIDTH,
            "parent_epochs": args.parent_epochs, **({"parent": str(args.parent)} if args.parent else {})}


def command(row: Row, args: argparse.Namespace, threads: int) -> list[str]:
    """The CLI command that produces ``row``'s checkpoint (recorded in the report)."""
    work, out = args.work, args.work / f"{row.name}.pth"
    common = ["--out", str(out), "--seed", str(args.seed), "--threads", str(threads), "--workers", "1",
              "--out-dir", str(work / "reports")]
    if row.kind == "qat":
        return ["qcompress", "qat", "-m", str(parent_path(args)), *row.qat_args, "--epochs", str(args.epochs),
                "--train-limit", str(args.train_limit), "--lr", str(args.lr), "--no-eval", "--no-ptq",
                "--report-name", row.name, *common]
    if row.kind == "parent" and args.parent:
        return ["given:", str(args.parent)]  # trained elsewhere; its sidecar records how
    if row.kind == "scratch":
        init, epochs, lr, limit = work / f"{row.name}-init.pth", args.base_epochs, args.base_lr, None
    elif row.kind == "variant":
        init, epochs, lr, limit = work / f"{row.name}-init.pth", args.variant_epochs, args.variant_lr, args.train_limit
    elif row.kind == "parent":
        init, epochs, lr, limit = work / f"{BASE.name}.pth", args.parent_epochs, args.lr, args.train_limit
    else:
        init, epochs, lr, limit = parent_path(args), args.epochs, args.lr, args.train_limit
    return ["qcompress", "train", "--init", str(init), "--epochs", str(epochs), "--lr", str(lr), "--batch-size", "16",
            "--eval-limit", "300" if row.kind == "scratch" else "100", *(["--limit", str(limit)] if limit else []), *common]


def build_init(row: Row, args: argparse.Namespace) -> None:
    """The init checkpoint of a from-scratch or variant row: built with the row's options; variants get
    every tensor under ``row.transfer`` that the trained base row has with the same name and shape."""
    from qcompress.core.checkpoints import load_detector, save_detector
    from qcompress.data.synthetic import SYNTH_CLASSES
    from qcompress.models.registry import build_detector

    out = args.work / f"{row.name}-init.pth"
    if out.is_file():
        return
    detector = build_detector(row.arch, SYNTH_CLASSES, **row.options)
    note = ["build", row.arch, json.dumps(row.options)]
    if row.transfer:
        base = load_detector(args.work / f"{BASE.name}.pth").model.state_dict()
        own = detector.model.state_dict()
        copied = {k: v for k, v in base.items() if k.startswith(row.transfer) and k in own and own[k].shape == v.shape}
        if not any(k.startswith("backbone.body.") for k in copied):
            raise SystemExit(f"{row.name}: the base row's ResNet body does not fit")
        detector.model.load_state_dict(copied, strict=False)
        note += ["transfer", *row.transfer, f"({len(copied)} of {len(own)} tensors from {BASE.name})"]
    save_detector(detector, out, command=note)


def evaluate(checkpoint: Path, limit: int) -> dict:
    """COCO-style AP (pycocotools) and VOC07 mAP of one checkpoint from one inference pass."""
    import torch

    from qcompress.core.checkpoints import load_detector
    from qcompress.core.evaluation import score_detections
    from qcompress.core.inference import predict_dataset
    from qcompress.core.loading import DataConfig, limited_indices, load_dataset

    torch.set_num_threads(1)
    detector = load_detector(checkpoint)
    dataset = load_dataset(DataConfig(limit=limit), detector.spec.class_names, "test")
    indices = limited_indices(dataset, limit)
    detections = predict_dataset(detector, dataset, indices, num_workers=0)
    ap, _, objects, extra = score_detections(dataset, indices, detections, "coco")
    voc07, *_ = score_detections(dataset, indices, detections, "voc07")
    return {"AP": ap, "AP50": extra["coco"]["AP50"], "voc07_mAP": voc07, "images": len(indices), "objects": objects}


def run_row(row: Row, args: argparse.Namespace, threads: int) -> dict:
    """Train (or resume) and evaluate one row unless its result exists with the same settings."""
    done_path = args.work / f"{row.name}.result.json"
    settings = _settings(args)
    if done_path.is_file():
        done = json.loads(done_path.read_text())
        if done.get("settings") == settings:
            return done
    ckpt = parent_path(args) if row.kind == "parent" else args.work / f"{row.name}.pth"
    cmd = command(row, args, threads)
    started = time.perf_counter()
    if not ckpt.is_file():
        if row.kind in ("scratch", "variant"):
            build_init(row, args)
        run_dir = args.work / f"{row.name}-run"
        resume = ["--resume"] if (run_dir / "last.pth").is_file() else []
        log = args.work / f"{row.name}.log"
        print(f"{row.name}: {shlex.join(cmd + resume)}  (log: {log})", flush=True)
        with log.open("a") as handle:
            code = subprocess.call(cmd + resume, stdout=handle, stderr=subprocess.STDOUT)
        if code != 0:
            raise SystemExit(f"{row.name} failed (exit {code}); see {log}")
    minutes = (time.perf_counter() - started) / 60
    scores = json.loads(subprocess.check_output(
        [sys.executable, __file__, "--eval-one", str(ckpt), "--limit", str(args.limit)], text=True).splitlines()[-1])
    result = {"row": row.name, "settings": settings, "command": shlex.join(cmd), "minutes": minutes, **scores}
    done_path.write_text(json.dumps(result, indent=1))
    print(f"{row.name}: AP {scores['AP']:.4f}, VOC07 {scores['voc07_mAP']:.4f} ({minutes:.1f} min)", flush=True)
    return result


def summarize(results: dict[str, dict], args: argparse.Namespace) -> Path:
    from qcompress.reports import Report, md_table, write_report
    from qcompress.runtime.binary import cpu_info

    parent = results[parent_row(args).name]
    rows, data = [], []
    for row in rows_for(args):
        if row.name not in results:
            continue
        res = results[row.name]
        delta = (res["AP"] - parent["AP"]) * 100 if row.kind == "qat" or row.kind == "finetune" else None
        comment = row.comment or f"fine-tuned from the fp32 {parent_row(args).name} row, {args.epochs} epochs"
        rows.append(["generated (synth-v1)", row.model, row.method, f"ResNet-18, {row.structure}", row.aw,
                     f"{res['AP'] * 100:.1f}", comment, f"{res['AP50'] * 100:.1f}", f"{res['voc07_mAP']:.3f}",
                     "" if delta is None else f"{delta:+.1f}"])
        data.append({"row": row.name, "model": row.model, "structure": row.structure, "method": row.method,
                     "A/W": row.aw, "AP": res["AP"], "AP50": res["AP50"], "voc07_mAP": res["voc07_mAP"],
                     "delta_AP_points": delta, "command": res["command"].replace(str(args.work), "$WORK"),
                     "minutes": res["minutes"], "comment": comment})
    s = _settings(args)
    parent_text = f"the parent row {s['parent_epochs']} more epochs, " if s["parent_epochs"] else ""
    report = Report(args.report_name, "Low-bit ResNet-18 FPN detectors: the A/W dashboard")
    report.add("Dashboard", md_table(
        ["Dataset", "Method", "Quantization method", "Model", "A/W", "AP", "Comment", "AP50", "VOC07 mAP",
         "Δ AP vs fp32 parent"], rows)
        + f"\n\nAP: COCO-style AP .50:.95 (pycocotools) ×100 on the first {args.limit} images of the generated test "
        f"split, {SIZE}x{SIZE} input, FPN/head width {WIDTH}; VOC07: 11-point mAP on the same detections. "
        + (f"The parent row is {Path(args.parent).name}, trained elsewhere (its sidecar holds its training); "
           if args.parent else
           f"The base row trained {s['base_epochs']} epochs on the 2400 training images; the variants "
           f"{s['variant_epochs']} epochs and {parent_text}")
        + f"every low-bit row and the control {s['epochs']} epochs on the first {s['train_limit']} training images. "
        "Low-bit rows keep the first conv and the output convs float; Quantize-Backbone is the ResNet body, Quantize-All "
        f"adds the FPN and the head towers. Machine: {cpu_info().model}.")
    # The low-bit rows train epochs the parent row did not: the control (the parent fine-tuned alike) is the fair
    # fp32 reference where it scores higher, so each bar is judged against the better of the two.
    reference = max(parent["AP"], results.get("fcos-fp32-more", parent)["AP"])
    bars = []
    for name, limit in (("fcos-dorefa-w2a2-backbone", 1.0), ("fcos-dorefa-w2a2-backbone-teacher", 1.0),
                        ("fcos-dorefa-w2a2-all", 4.0), ("fcos-lsq-w4a4-all", 1.5)):
        if name in results:
            delta = (results[name]["AP"] - reference) * 100
            bars.append([name, f"within {limit} AP points", f"{delta:+.2f}", "met" if delta >= -limit else "not met"])
    if bars:
        report.add("Issue 21's bars", md_table(["row", "bar", "Δ AP points", "verdict"], bars)
                   + f"\n\nAgainst the better fp32 of the parent row and its control ({reference * 100:.2f} AP).")
    report.add("Commands", "\n".join(f"- `{d['row']}`: `{d['command']}`" for d in data)
               + f"\n\n`$WORK` is `--work`. `{' '.join(['python benchmarks/lowbit_dashboard.py', _flags(args)]).strip()}` runs them all "
               "(resumable) and builds the init checkpoints: the base from scratch, the variants with the base's "
               "trained tensors copied in.")
    report.data.update({"benchmark": "lowbit-dashboard", "settings": s, "rows": data})
    write_report(report, args.out_dir)
    return args.out_dir / f"{args.report_name}.md"


def _flags(args: argparse.Namespace) -> str:
    """The settings that differ from the defaults, as flags."""
    defaults = vars(build_parser().parse_args([]))
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in _settings(args).items()
                    if k in defaults and defaults[k] != v)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/qcompress-dashboard"), help="checkpoints (outside git)")
    parser.add_argument("--out-dir", type=Path, default=Path("eval_results"))
    parser.add_argument("--jobs", type=int, default=2, help="rows trained at once (one torch thread each)")
    parser.add_argument("--base-epochs", type=int, default=6)
    parser.add_argument("--base-lr", type=float, default=0.002)
    parser.add_argument("--variant-epochs", type=int, default=2)
    parser.add_argument("--variant-lr", type=float, default=0.001)
    parser.add_argument("--parent-epochs", type=int, default=0,
                        help="train the base this many more epochs (low-bit rows' images and lr) as their parent")
    parser.add_argument("--parent", type=Path, default=None,
                        help="a trained fp32 checkpoint as the parent row (no base, no structure variants)")
    parser.add_argument("--epochs", type=int, default=2, help="low-bit rows and the control")
    parser.add_argument("--train-limit", type=int, default=600)
    parser.add_argument("--lr", type=float, default=5e-4, help="low-bit rows and the control")
    parser.add_argument("--limit", type=int, default=300, help="test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None, choices=[r.name for r in ROWS])
    parser.add_argument("--collect", action="store_true", help="only write the table from finished rows")
    parser.add_argument("--report-name", default="lowbit-dashboard")
    parser.add_argument("--eval-one", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from qcompress._warnings import install_filters

    install_filters()
    if args.eval_one is not None:
        print(json.dumps(evaluate(args.eval_one, args.limit)))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    if args.collect:
        found = {}
        for row in rows_for(args):
            path = args.work / f"{row.name}.result.json"
            if path.is_file():
                found[row.name] = json.loads(path.read_text())
        print(f"wrote {summarize(found, args)}")
        return 0
    wanted = [r for r in rows_for(args) if args.only is None or r.name in args.only]
    results = {} if args.parent else {BASE.name: run_row(BASE, args, threads=args.jobs)}
    if args.parent_epochs or args.parent:
        results[PARENT.name] = run_row(PARENT, args, threads=args.jobs)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        # The rows the bars judge first, the fp32 structure variants last.
        order = sorted((r for r in wanted if r not in (BASE, PARENT)), key=lambda r: {"finetune": 0, "qat": 1}.get(r.kind, 2))
        futures = {r.name: pool.submit(run_row, r, args, 1) for r in order}
        results |= {name: f.result() for name, f in futures.items()}
    print(f"wrote {summarize(results, args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
