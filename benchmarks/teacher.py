"""The fp32 parent as teacher: each compression fine-tune with and without it, same epochs and images.

Pairs (embedded default unless --model-path): LSQ w4a4 backbone; fully quantized LSQ w4a4 (scope all,
heads quantized: --scope all --heads); binary backbone; channel pruning 0.3 + fine-tune. Every run is
the CLI's job (qat / prune) with the same --epochs, --train-limit training images, --limit test
images and seed; the teacher run adds --teacher parent (feature imitation, weight --imitation).

Writes each run's own report (teacher-<pair>-<labels|teacher>.{json,md}) and the summary
teacher.{json,md} to --out-dir. Resumable: a run whose report exists with the same settings is not
run again (a long grid can be interrupted and continued).

Usage: python benchmarks/teacher.py [--epochs 2] [--train-limit 400] [--limit 300] [--only lsq-backbone ...]
       python benchmarks/teacher.py --collect DIR [DIR ...] --out-dir eval_results/teacher   # summary only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from qcompress._warnings import install_filters
from qcompress.core import DataConfig, ModelConfig
from qcompress.jobs.prune import PruneJobConfig, prune
from qcompress.jobs.qat import QATJobConfig, qat
from qcompress.reports import Report, md_table, write_report
from qcompress.runtime.binary import cpu_info
from qcompress.training.distill import DistillConfig

# pair -> (what the CLI runs, job kind, job options)
PAIRS = {
    "lsq-backbone": ("qat --method lsq --bits-w 4 --bits-a 4 --scope backbone", "qat",
                     {"method": "lsq", "bits_w": 4, "bits_a": 4, "scope": "backbone"}),
    "lsq-fully-quantized": ("qat --method lsq --bits-w 4 --bits-a 4 --scope all --heads", "qat",
                            {"method": "lsq", "bits_w": 4, "bits_a": 4, "scope": "all", "heads": True}),
    "binary-backbone": ("qat --method binary --scope backbone", "qat", {"method": "binary", "scope": "backbone"}),
    "prune-channels-0.3": ("prune --method channels --amount 0.3 --finetune-epochs E", "prune",
                           {"method": "channels", "amount": 0.3}),
}


TEACHER_ONLY = ("imitation", "distill_outputs")  # settings a labels-only run does not depend on


def _settings(args: argparse.Namespace, teacher: bool = True) -> dict:
    settings = {"epochs": args.epochs, "train_limit": args.train_limit, "limit": args.limit, "seed": args.seed,
                "imitation": args.imitation, "distill_outputs": args.distill_outputs, "calib_images": args.calib_images,
                "model_path": str(args.model_path) if args.model_path else None, "bn_reestimate": args.bn_reestimate}
    return settings if teacher else _shared(settings)


def _shared(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in TEACHER_ONLY}


def run_one(pair: str, teacher: bool, args: argparse.Namespace) -> dict:
    cli, kind, options = PAIRS[pair]
    name = f"teacher-{pair}-{'teacher' if teacher else 'labels'}"
    path = args.out_dir / f"{name}.json"
    settings = _settings(args, teacher)
    if path.is_file():
        done = json.loads(path.read_text())
        if (done.get("benchmark_settings") if teacher else _shared(done.get("benchmark_settings") or {})) == settings:
            print(f"{name}: done before, reusing {path}")
            return done
    model = ModelConfig(args.model_path)
    data = DataConfig(limit=args.limit)
    distill = DistillConfig(imitation=args.imitation, outputs=args.distill_outputs)
    ckpt = args.work / f"{name}.pth"
    started = time.perf_counter()
    if kind == "qat":
        config = QATJobConfig(model=model, data=data, train_limit=args.train_limit, epochs=args.epochs,
                              calib_images=args.calib_images, ptq_baseline=False, out=ckpt, seed=args.seed,
                              teacher="parent" if teacher else None, distill=distill, report_name=name, bn_reestimate=args.bn_reestimate,
                              out_dir=args.out_dir, **options)
        result, report = qat(config)
        fp32, final, history = result.fp32.mAP, result.qat.mAP, result.history
    else:
        config = PruneJobConfig(model=model, data=data, train_limit=args.train_limit, finetune_epochs=args.epochs,
                                out=ckpt, seed=args.seed, teacher="parent" if teacher else None, distill=distill,
                                bn_reestimate=args.bn_reestimate,
                                report_name=name, out_dir=args.out_dir, onnx_latency=False, latency_runs=5, **options)
        result, report = prune(config)
        fp32, final, history = result.before.eval.mAP, result.finetuned_eval.mAP, result.finetune_history
    seconds = time.perf_counter() - started
    summary = {"pair": pair, "teacher": teacher, "cli": cli, "fp32": fp32, "mAP": final, "history": history,
               "seconds": seconds}
    report.data.update({"benchmark_settings": settings, "benchmark_summary": summary})
    write_report(report, args.out_dir)
    print(f"{name}: fp32 {fp32:.4f} -> {final:.4f} ({(final - fp32) * 100:+.2f} points), {seconds / 60:.1f} min")
    return report.data


def summarize(runs: list[dict], out_dir: Path) -> Path:
    """The summary report over pairs of run reports (each holds its settings and summary)."""
    by_pair: dict[str, dict[bool, dict]] = {}
    for data in runs:
        summary = data["benchmark_summary"]
        by_pair.setdefault(summary["pair"], {})[summary["teacher"]] = data
    rows, pairs, curves = [], [], []
    for pair, both in by_pair.items():
        if set(both) != {False, True}:
            continue
        labels, taught = both[False]["benchmark_summary"], both[True]["benchmark_summary"]
        settings = both[True]["benchmark_settings"]
        if _shared(settings) != _shared(both[False]["benchmark_settings"]):
            raise SystemExit(f"{pair}: the two runs used other settings")
        fp32 = labels["fp32"]
        gap_labels, gap_teacher = fp32 - labels["mAP"], fp32 - taught["mAP"]
        recovered = (gap_labels - gap_teacher) / gap_labels if gap_labels > 0 else float("nan")
        reestimate = settings.get("bn_reestimate", True)  # runs before the flag existed always re-estimated
        weights = f" --imitation {settings['imitation']:g}" + (
            f" --distill-outputs {settings['distill_outputs']:g}" if settings["distill_outputs"] else "")
        command = (f"python benchmarks/teacher.py --epochs {settings['epochs']} --train-limit {settings['train_limit']} "
                   f"--limit {settings['limit']} --only {pair}{weights}{' --bn-reestimate' if reestimate else ''}")
        pairs.append({"pair": pair, "cli": labels["cli"], "settings": settings, "command": command, "fp32": fp32,
                      "labels": labels["mAP"], "teacher": taught["mAP"],
                      "teacher_gain_points": (taught["mAP"] - labels["mAP"]) * 100, "gap_recovered": recovered,
                      "history_labels": labels["history"], "history_teacher": taught["history"],
                      "minutes": [labels["seconds"] / 60, taught["seconds"] / 60]})
        rows.append([pair, labels["cli"] + (" --bn-reestimate" if reestimate else ""),
                     f"{settings['epochs']} / {settings['train_limit']} / {settings['limit']}",
                     fp32, labels["mAP"], (labels["mAP"] - fp32) * 100, taught["mAP"], (taught["mAP"] - fp32) * 100,
                     (taught["mAP"] - labels["mAP"]) * 100, recovered])
        for who, hist in (("labels", labels["history"]), ("teacher", taught["history"])):
            for h in hist:
                curves.append([pair, who, h["epoch"], h["regression_loss"] + h["classification_loss"],
                               h.get("imitation_loss"), h.get("output_distill_loss")])
    report = Report("teacher", "The fp32 parent as teacher: with and without, same epochs and images per pair")
    report.add("Results", md_table(
        ["pair", "command (qcompress ...)", "epochs / train images / test images", "fp32 mAP", "labels only",
         "Δ points", "with teacher", "Δ points", "teacher gain (points)", "share of the gap recovered"], rows)
        + "\n\nmAP: VOC07 11-point on the first test images of the generated test split; training on the first "
        "training images; seed 0; both runs of a pair alike (with `--bn-reestimate` both re-estimate BN after training). "
        "The teacher run adds `--teacher parent` (fine-grained feature imitation, psi 0.5, weight lambda as in "
        "each command; before the loss took the paper's normalisation, sum over channels / 2 N_p with lambda 0.01, "
        "it was the mean over channels with lambda 1). Commands: " + "; ".join(f"`{p['command']}`" for p in pairs)
        + f". Machine: {cpu_info().model}, "
        "2 cores shared with other jobs (times are not comparable between runs).")
    report.add("Loss curves (per epoch, averaged per step)", md_table(
        ["pair", "run", "epoch", "task loss (box + class)", "imitation loss (weighted)", "output distillation"], curves))
    report.data.update({"benchmark": "teacher", "pairs": pairs,
                        "machine": {"cpu": cpu_info().model, "python": sys.version.split()[0]}})
    write_report(report, out_dir)
    return out_dir / "teacher.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, default=None, help="float parent (default: the embedded default)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-limit", type=int, default=400, help="training images (the first N of train)")
    parser.add_argument("--limit", type=int, default=300, help="test images (the first N of test)")
    parser.add_argument("--calib-images", type=int, default=64)
    parser.add_argument("--imitation", type=float, default=0.01, help="lambda (the paper's code's 0.01)")
    parser.add_argument("--distill-outputs", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bn-reestimate", action="store_true",
                        help="both runs of a pair re-estimate BN after training (where measured it cost accuracy)")
    parser.add_argument("--only", nargs="*", default=["lsq-backbone", "prune-channels-0.3", "lsq-fully-quantized",
                                                      "binary-backbone"], choices=list(PAIRS))
    parser.add_argument("--out-dir", type=Path, default=Path("eval_results"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/qcompress-teacher"),
                        help="checkpoints of the runs (outside git)")
    parser.add_argument("--collect", type=Path, nargs="*", default=None,
                        help="only summarise the run reports found in these folders (runs of several settings)")
    args = parser.parse_args(argv)
    install_filters()
    if args.collect is not None:
        found = [json.loads(p.read_text()) for d in args.collect for p in sorted(d.glob("teacher-*.json"))]
        print(f"wrote {summarize([d for d in found if 'benchmark_summary' in d], args.out_dir)}")
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    runs = [run_one(pair, teacher, args) for pair in args.only for teacher in (False, True)]
    print(f"wrote {summarize(runs, args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
