"""Issue 20's table: CenterNet with binary parts (Stem | Encoder | Decoder | Heads | mAP | eq FLOPs), measured.

Runs, from one fp32 CenterNet (``--parent``), in ``--work``:

1. ``qcompress quantize`` (int8, the speed reference of the "vs int8" column);
2. ``qcompress qat --method binary --steps "layer*.conv*;deconv_layers.*;hm.0,wh.0,reg.0;conv1"``: the
   encoder's 3x3 convs, then + the decoder's transposed convs, + the heads' 3x3 convs, + the stem, each step
   fine-tuned from the previous one (the encoder's 1x1 downsampling shortcuts and the heads' output 1x1
   stay float, as in the binary literature);

then evaluates every model on the same test images (VOC07 mAP and COCO-style AP), counts equivalent FLOPs
(multiply-accumulates of the float convs + binary ones / 64, the convention of the binary-network
literature: Bi-Real Net, XNOR-Net) and times fp32 (torch eager), int8 (torch eager, its backend) and each
binary row (binary convs in the bitpacked XNOR engine, the rest torch eager) interleaved in one run,
batch 1. Each step that already has its checkpoint in ``--work`` is not re-run (delete it to redo).

    python benchmarks/centernet_table.py --parent P [--epochs 2 | --step-epochs 3,1,1,1] [--train-limit 1200]
        [--threads 2] [--encoder-scales learned] [--imitation 0.1] [--speed-only]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

STEPS = "layer*.conv*;deconv_layers.*;hm.0,wh.0,reg.0;conv1"
PARTS = ("encoder", "decoder", "heads", "stem")  # what each step adds
COLUMNS = ("stem", "encoder", "decoder", "heads")  # the source's column order


def run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def equivalent_flops(model, shape: tuple[int, ...]) -> tuple[float, float]:
    """(equivalent FLOPs, binary share of the MACs) of ``model``'s convs (binary ones count / 64)."""
    from qcompress.bench.size import conv_macs
    from qcompress.bench.size import equivalent_flops as eq_flops
    from qcompress.quant.lowbit import BinaryWeightQuantizer

    macs = conv_macs(model, shape)
    binary = {n for n, m in model.named_modules() if isinstance(getattr(m, "weight_quantizer", None), BinaryWeightQuantizer)}
    return eq_flops(macs, binary), sum(v for n, v in macs.items() if n in binary) / sum(macs.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parent", required=True, help="fp32 CenterNet checkpoint (no trained one ships yet)")
    parser.add_argument("--work", type=Path, default=Path("runs/centernet-table"))
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs per step")
    parser.add_argument("--step-epochs", default=None,
                        help="epochs of each of the 4 steps, e.g. 3,1,1,1 (qat --step-epochs); the extra encoder "
                             "rows train the first number")
    parser.add_argument("--train-limit", type=int, default=1200, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--binary-scale", choices=("layer", "spatial", "learned"), default="layer")
    parser.add_argument("--encoder-scales", nargs="*", default=[], choices=("layer", "spatial", "learned"),
                        help="extra binary-encoder rows, each one qat step with this --binary-scale")
    parser.add_argument("--imitation", type=float, default=0.0,
                        help="> 0: every binary run distils from the fp32 parent (qat --teacher parent --imitation)")
    parser.add_argument("--limit", type=int, default=300, help="test images")
    parser.add_argument("--threads", type=int, default=2, help="threads for fine-tuning")
    parser.add_argument("--bench-threads", type=int, default=1, help="threads for the timing")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out-dir", type=Path, default=Path("eval_results"))
    parser.add_argument("--name", default="centernet-binary-table")
    parser.add_argument("--speed-only", action="store_true",
                        help="no fine-tuning and no mAP: each row's binary layers wrapped on the parent's weights "
                             "(calibrated on test images) only to count equivalent FLOPs and time the engine")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    exe = [sys.executable, "-m", "qcompress"]
    int8 = args.work / "centernet-int8.pth"
    binary = args.work / "centernet-binary.pth"
    steps = [binary.with_name(f"{binary.stem}-step{k}.pth") for k in range(1, len(PARTS) + 1)]
    common = ["--limit", str(args.limit), "--out-dir", str(args.work / "reports")]
    def steps_command(steps_text: str, scale: str, out: Path) -> list[str]:
        epochs = ["--epochs", str(args.epochs)]
        if args.step_epochs:
            first = args.step_epochs.split(",")[0]
            epochs = ["--step-epochs", args.step_epochs] if ";" in steps_text else ["--epochs", first]
        return [*exe, "qat", "-m", args.parent, "--method", "binary", "--steps", steps_text, *epochs,
                "--train-limit", str(args.train_limit), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                "--binary-scale", scale, "--threads", str(args.threads), "--out", str(out),
                *(["--teacher", "parent", "--imitation", str(args.imitation)] if args.imitation > 0 else []),
                "--report-name", f"{args.name}-{out.stem}", *common]

    commands = {"int8": [*exe, "quantize", "-m", args.parent, "--out", str(int8), "--threads", str(args.threads), *common],
                "binary": steps_command(STEPS, args.binary_scale, binary)}
    # (row name, checkpoint, parts binarized, binary scale)
    plan: list[tuple[str, Path, set[str], str]] = [
        (f"binary step {k}", path, set(PARTS[:k]), args.binary_scale) for k, path in enumerate(steps, 1)]
    for scale in args.encoder_scales:
        out = args.work / f"centernet-binary-encoder-{scale}.pth"
        commands[f"encoder-{scale}"] = steps_command(STEPS.split(";")[0], scale, out)
        plan.insert(1 + args.encoder_scales.index(scale), (f"binary encoder ({scale} scale)",
                                                           out.with_name(f"{out.stem}-step1.pth"), {"encoder"}, scale))
    if not int8.is_file():
        run(commands["int8"])
    if args.speed_only:
        del commands["binary"]
        for scale in args.encoder_scales:
            del commands[f"encoder-{scale}"]
    else:
        if not steps[-1].is_file():
            run(commands["binary"])
        for scale in args.encoder_scales:
            if not (args.work / f"centernet-binary-encoder-{scale}-step1.pth").is_file():
                run(commands[f"encoder-{scale}"])

    import torch
    from lowbit_dashboard import evaluate  # the dashboard's evaluation: one inference pass, VOC07 + COCO AP

    from qcompress._warnings import install_filters, quiet_torch_ao
    from qcompress.bench.latency import interleaved_latency
    from qcompress.core.checkpoints import load_detector
    from qcompress.core.loading import ModelConfig, resolve_model_path
    from qcompress.jobs.bench import _quantization
    from qcompress.runtime.binary import convert_binary, cpu_info, fold_batchnorm

    install_filters()
    parent_path = resolve_model_path(ModelConfig(args.parent))
    plan = [("fp32", parent_path, set(), "–"), ("int8", int8, set(), "–"), *plan]
    with quiet_torch_ao():
        detectors = [load_detector(path) for _, path, _, _ in plan[:2]]
        if args.speed_only:
            detectors += speed_only_models(detectors[0], plan[2:])
        else:
            detectors += [load_detector(path) for _, path, _, _ in plan[2:]]
    h, w = detectors[0].spec.input_size
    shape = (1, 3, h, w)
    rows = []
    for k, ((name, path, binarized, scale), det) in enumerate(zip(plan, detectors)):
        if args.speed_only and k >= 2:
            scores = {"AP": None, "AP50": None, "voc07_mAP": None, "images": 0, "objects": 0}
            path = "(not fine-tuned: speed only)"
        else:
            with quiet_torch_ao():
                scores = evaluate(path, args.limit)
        flops, share = equivalent_flops(det.model, shape)
        rows.append({"row": name, "checkpoint": str(path), "scale": scale,
                     **{c: "binary" if c in binarized else "int8" if k == 1 else "fp32" for c in COLUMNS},
                     **scores, "eq_flops": None if k == 1 else flops, "binary_mac_share": share})
        print(f"{name}: VOC07 {scores['voc07_mAP']}, AP {scores['AP']}", flush=True)
    models, engines, skipped = [], [], []
    for k, det in enumerate(detectors):
        if k >= 2:  # binary rows: their binary convs in the engine, BatchNorms folded into the convs before them
            engine_model, conversion = convert_binary(det.model.eval(), fold_bn=True)
            models.append(engine_model)
            skipped.append(sorted(conversion.skipped))
        else:  # fp32: BatchNorms folded likewise; int8: fused by quantization already
            models.append(det.model.eval())
            if k == 0:
                fold_batchnorm(models[0])
            skipped.append([])
        engines.append((_quantization(det) or {}).get("backend"))  # int8: the backend it was built for
    with quiet_torch_ao(), torch.no_grad():
        stats = interleaved_latency(models, shape, args.runs, 3, args.bench_threads, 0, engines)
    for row, stat, left in zip(rows, stats, skipped):
        row.update(latency_ms=stat.median_ms, speedup_vs_fp32=stats[0].median_ms / stat.median_ms,
                   speedup_vs_int8=stats[1].median_ms / stat.median_ms, not_in_engine=left)
    fp32_flops = rows[0]["eq_flops"]
    info = cpu_info()
    sets = [k for k, v in info.instruction_sets.items() if v]
    write(args, rows, fp32_flops, info.model, sets, commands, time.perf_counter() - started)
    return 0


def speed_only_models(parent, plan) -> list:
    """The rows' binary networks without fine-tuning: the parent's weights, each row's binary layers wrapped
    (cumulative steps, as qat --steps) and their quantizers set from 4 test images."""
    import copy

    from qcompress.core.loading import DataConfig, calibration_batches, load_dataset
    from qcompress.jobs.qat_steps import parse_steps, resolve_steps
    from qcompress.quant.lowbit import initialize_lowbit, wrap_convs

    dataset = load_dataset(DataConfig(limit=4), parent.spec.class_names, "test")
    batches = calibration_batches(parent, dataset, 4, 0)
    groups = resolve_steps(parent.model, parse_steps(STEPS), binary=True)
    made = []
    for _name, _path, binarized, scale in plan:
        model = copy.deepcopy(parent.model)
        names = [n for part, group in zip(PARTS, groups) if part in binarized for n in group]
        wrap_convs(model, names, "binary", 1, 1, binary_scale=scale)
        initialize_lowbit(model, batches)
        made.append(parent.with_model(model.eval()))
    return made


def epochs_words(args) -> str:
    if args.step_epochs:
        return f"{args.step_epochs.replace(',', ', ')} epochs (step by step)"
    return f"{args.epochs} epoch(s)"


def write(args, rows, fp32_flops: float, cpu: str, sets: list[str], commands, seconds: float) -> None:
    fp32_map = rows[0]["voc07_mAP"]
    first_step_words = " (the first step's epochs)" if args.step_epochs else ""

    def pct(value: float | None) -> str:
        return "–" if value is None else f"{value / max(fp32_map, 1e-9) * 100:.1f} %"

    def num(value: float | None, fmt: str) -> str:
        return "–" if value is None else fmt.format(value)

    lines = [f"# CenterNet ResNet-18 with binary parts ({args.name})", "",
             ("| Stem | Encoder | Decoder | Heads | binary scale | VOC07 mAP | % of fp32 | COCO AP | eq FLOPs (G) "
              "| fewer eq FLOPs | latency (ms) | speed-up vs fp32 | speed-up vs int8 |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flops = "–" if r["eq_flops"] is None else f"{r['eq_flops'] / 1e9:.3f}"
        fewer = "–" if r["eq_flops"] is None else f"{fp32_flops / r['eq_flops']:.2f}x"
        lines.append(f"| {' | '.join(r[c] for c in COLUMNS)} | {r['scale']} | {num(r['voc07_mAP'], '{:.4f}')} "
                     f"| {pct(r['voc07_mAP'])} | {num(r['AP'] and r['AP'] * 100, '{:.1f}')} | {flops} | {fewer} | {r['latency_ms']:.1f} | {r['speedup_vs_fp32']:.2f}x "
                     f"| {r['speedup_vs_int8']:.2f}x |")
    left = sorted({n for r in rows for n in r["not_in_engine"]})
    lines += ["", f"VOC07: 11-point mAP on the first {args.limit} images of the generated test split; COCO AP: "
              ".50:.95 (pycocotools) on the same detections. "
              + ("Speed only (--speed-only): the binary rows are the parent's weights with each row's binary layers "
                 "wrapped and calibrated on 4 test images, not fine-tuned, so they have no mAP; latency does not "
                 "depend on the weights. " if args.speed_only else
                 "Binary rows are cumulative `qcompress qat --method binary --steps` steps, each fine-tuned "
                 f"{epochs_words(args)} x {args.train_limit} training images from the previous one; the `binary "
                 "encoder (... scale)` rows one such step from fp32 with that `--binary-scale`"
                 f"{first_step_words}. ")
              + "Equivalent FLOPs = multiply-accumulates of the "
              "float layers + binary ones / 64 (the binary-network literature's convention; int8 has none). "
              f"Latency: median of {args.runs} runs, batch 1, {args.bench_threads} thread(s), every model interleaved "
              f"in one run on {cpu} ({', '.join(sets) or 'no SIMD extension listed'}): fp32 and int8 in torch eager, "
              "binary rows with their binary convs in the bitpacked XNOR engine (qcompress.runtime.binary); every "
              "BatchNorm folded into the conv before it (int8: by quantization; fp32 and binary: fold_batchnorm)"
              + (f"; left float (fake quant) there: {', '.join(left)}."
                 if left else "."), "", "Commands:", ""]
    lines += [f"- `{shlex.join(c[2:] if c[1] == '-m' else c)}`" for c in commands.values()]
    lines += [f"- `{shlex.join(['python', 'benchmarks/centernet_table.py', *sys.argv[1:]])}` ({seconds / 60:.1f} min)"]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(
        {"rows": rows, "settings": {k: str(v) for k, v in vars(args).items()}, "cpu": cpu, "instruction_sets": sets,
         "commands": commands, "seconds": seconds}, indent=1), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
