"""Time the data layer: generating synthetic images and reading VOC annotations.

Moved here from the test suite, where the timings were only printed (a test that cannot fail).

Usage: python benchmarks/data_speed.py [--images 300] [--annotations 5000] [--workers 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from qcompress.data.synthetic import SYNTH_CLASSES, generate_voc_dataset
from qcompress.data.voc import VOCDataset

_XML = """<annotation><size><width>300</width><height>200</height><depth>3</depth></size>{objects}</annotation>"""
_OBJECT = """<object><name>{name}</name><difficult>{difficult}</difficult>
<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"""


def time_generation(root: Path, images: int, workers: int) -> float:
    start = time.perf_counter()
    generate_voc_dataset(root / "synth", num_images=images, seed=2, workers=workers)
    return time.perf_counter() - start


def time_annotations(root: Path, count: int) -> float:
    year = root / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (year / sub).mkdir(parents=True)
    objects = [(SYNTH_CLASSES[1], (1, 2, 30, 40), 0), (SYNTH_CLASSES[2], (3, 4, 50, 38), 1),
               (SYNTH_CLASSES[3], (5, 5, 9, 9), 0)]
    text = _XML.format(objects="".join(
        _OBJECT.format(name=n, difficult=d, x1=b[0], y1=b[1], x2=b[2], y2=b[3]) for n, b, d in objects))
    stems = [f"{i:06d}" for i in range(count)]
    for stem in stems:
        (year / "Annotations" / f"{stem}.xml").write_text(text)
    (year / "ImageSets" / "Main" / "train.txt").write_text("\n".join(stems) + "\n")
    start = time.perf_counter()
    annotations = VOCDataset(year, "train", SYNTH_CLASSES).load_all_annotations()
    elapsed = time.perf_counter() - start
    assert len(annotations) == count
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--annotations", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        seconds = time_generation(Path(tmp), args.images, args.workers)
        print(f"generated {args.images} synthetic images in {seconds:.1f} s ({args.workers} process(es), "
              f"{1000 * seconds / args.images:.1f} ms per image)")
    with tempfile.TemporaryDirectory() as tmp:
        seconds = time_annotations(Path(tmp), args.annotations)
        print(f"read {args.annotations} VOC XML files in {seconds:.2f} s "
              f"({1e6 * seconds / args.annotations:.0f} us per file)")


if __name__ == "__main__":
    main()
