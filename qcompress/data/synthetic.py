"""The generated default dataset: coloured, textured shapes on cluttered backgrounds, in VOC layout.

Each image is drawn from its own random stream, seeded by ``(seed, index)``, so the files are
identical whatever the number of worker processes. Boxes are tight around the *visible* part of
each drawn shape (computed from its anti-aliased mask after later objects are drawn over it).

What makes an object ``difficult`` (VOC AP then ignores it): its visible box is under 8% of the
image side, or more than 40% of its area is hidden by other objects or the image border. No
object is more than 55% hidden: a placement that would hide more is retried elsewhere or dropped.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from qcompress.errors import QCompressError
from qcompress.io_utils import BACKGROUND

log = logging.getLogger(__name__)

GENERATOR_VERSION = "synth-v1"
FOLDER_NAME = "SYNTH"
SYNTH_CLASSES: tuple[str, ...] = (
    BACKGROUND,
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "hexagon",
    "arrow",
)

# Object extent (longer side of its box) as a fraction of the image side.
TINY_FRACTION = 0.08  # below this the object is difficult
_P_TINY, _P_SMALL = 0.08, 0.17  # the rest is log-uniform in [0.14, 0.70]
_MAX_HIDDEN = 0.55  # placements hiding more of any object are rejected
_DIFFICULT_HIDDEN = 0.40
_MIN_IN_IMAGE = 0.80  # at most 20% of an object may fall outside the image
_SUPERSAMPLE = 4
_VISIBLE_WEIGHT = 0.3  # a pixel belongs to an object's box if >= 30% of its colour comes from it
_JPEG_QUALITY = 95


@dataclass(frozen=True)
class SynthObject:
    """One annotated object; ``box`` is VOC-style 1-based inclusive ``(xmin, ymin, xmax, ymax)``."""

    name: str
    box: tuple[int, int, int, int]
    difficult: bool
    truncated: bool
    visible_fraction: float


# ---------------------------------------------------------------------------------------------
# Geometry: unit shapes centred on the origin, as lists of polygons (the first is filled, the rest
# are holes).


def _regular(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _unit_shape(name: str, rng: np.random.Generator) -> list[np.ndarray]:
    if name == "circle":
        return [_regular(48)]
    if name == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)]
    if name == "triangle":
        return [_regular(3)]
    if name == "star":
        inner = rng.uniform(0.38, 0.5)
        outer = _regular(5)
        inner_pts = _regular(5, inner, phase=-math.pi / 2 + math.pi / 5)
        return [np.stack([outer, inner_pts], axis=1).reshape(-1, 2)]
    if name == "cross":
        t = rng.uniform(0.26, 0.36)
        return [
            np.array(
                [
                    [-t, -1],
                    [t, -1],
                    [t, -t],
                    [1, -t],
                    [1, t],
                    [t, t],
                    [t, 1],
                    [-t, 1],
                    [-t, t],
                    [-1, t],
                    [-1, -t],
                    [-t, -t],
                ],
                float,
            )
        ]
    if name == "ring":
        return [_regular(48), _regular(48, rng.uniform(0.5, 0.66))]
    if name == "hexagon":
        return [_regular(6, phase=0.0)]
    if name == "arrow":
        shaft, head, neck = rng.uniform(0.16, 0.26), rng.uniform(0.5, 0.62), rng.uniform(0.05, 0.3)
        return [
            np.array(
                [
                    [-1, -shaft],
                    [neck, -shaft],
                    [neck, -head],
                    [1, 0],
                    [neck, head],
                    [neck, shaft],
                    [-1, shaft],
                ],
                float,
            )
            * [1.0, 0.9]
        ]
    raise ValueError(name)


_ROTATION_PERIOD = {
    "circle": 180.0,
    "square": 90.0,
    "triangle": 360.0,
    "star": 72.0,
    "cross": 90.0,
    "ring": 180.0,
    "hexagon": 60.0,
    "arrow": 360.0,
}


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, np.float32) * 255.0


# ---------------------------------------------------------------------------------------------
# Rendering


@dataclass
class _Placed:
    name: str
    x0: int
    y0: int
    alpha: np.ndarray  # (h, w) float32 coverage of the region starting at (x0, y0)
    visible: np.ndarray  # coverage left after the objects drawn above it
    full_area: float  # area of the whole shape, inside the image or not
    tones: tuple[np.ndarray, ...] = ()


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.3), rng.uniform(0.35, 0.8))
    grid = int(rng.integers(3, 9))
    blotches = rng.uniform(0, 255, (grid, grid, 3)).astype(np.uint8)
    blotches = Image.fromarray(blotches).resize((size, size), Image.Resampling.BICUBIC)
    amplitude = rng.uniform(8, 22)
    image = base + (np.asarray(blotches, np.float32) - 127.5) * (amplitude / 127.5)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.arange(size, dtype=np.float32) / size - 0.5) * rng.uniform(10, 40)
    image += (math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None])[..., None]
    if rng.uniform() < 0.4:  # faint woven texture
        period = rng.uniform(4, 10)
        xs = np.arange(size, dtype=np.float32)
        weave = np.sin(xs[None, :] * 2 * math.pi / period) * np.sin(xs[:, None] * 2 * math.pi / period)
        image += (weave * rng.uniform(3, 7))[..., None]
    image += rng.normal(0, 2.5, (size, size, 1)).astype(np.float32)
    return np.clip(image, 0, 255)


def _clutter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Thin lines, arcs, squiggles and soft smudges: texture that belongs to no class.

    Nothing here has a crisp closed outline, so no distractor can pass for a small shape.
    """
    size = image.shape[0]
    canvas = Image.fromarray(image.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    mean = image.reshape(-1, 3).mean(axis=0)

    def tone(low: float, high: float) -> tuple[int, int, int]:
        shift = rng.uniform(low, high) * rng.choice([-1.0, 1.0])
        tint = rng.normal(0, 12, 3)
        return tuple(int(c) for c in np.clip(mean + shift + tint, 0, 255))

    for _ in range(int(rng.integers(0, 5))):
        a, b = rng.uniform(-0.1, 1.1, 2) * size, rng.uniform(-0.1, 1.1, 2) * size
        draw.line([tuple(a), tuple(b)], fill=tone(25, 60), width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(0, 3))):
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(0.05, 0.2) * size
        start = rng.uniform(0, 360)
        draw.arc(
            [cx - r, cy - r, cx + r, cy + r],
            start,
            start + rng.uniform(40, 160),
            fill=tone(25, 55),
            width=int(rng.integers(1, 3)),
        )
    for _ in range(int(rng.integers(0, 3))):  # squiggles: short random walks
        steps = int(rng.integers(4, 9))
        heading = rng.uniform(0, 2 * math.pi)
        point = rng.uniform(0, size, 2)
        points = [tuple(point)]
        for _step in range(steps):
            heading += rng.normal(0, 0.7)
            point = point + rng.uniform(0.01, 0.03) * size * np.array([math.cos(heading), math.sin(heading)])
            points.append(tuple(point))
        draw.line(points, fill=tone(25, 50), width=int(rng.integers(1, 4)), joint="curve")
    result = np.asarray(canvas, np.float32).copy()

    for _ in range(int(rng.integers(0, 4))):  # soft smudges: blurred, low-contrast, no edges
        radius = rng.uniform(0.02, 0.06) * size
        half = int(radius * 2.5) + 2
        cx, cy = (int(v) for v in rng.uniform(0, size, 2))
        spot = Image.new("L", (2 * half, 2 * half), 0)
        stretch = rng.uniform(0.4, 1.0)
        ImageDraw.Draw(spot).ellipse(
            [half - radius, half - radius * stretch, half + radius, half + radius * stretch], fill=255
        )
        spot = spot.rotate(rng.uniform(0, 180)).filter(ImageFilter.GaussianBlur(radius * 0.6))
        x0, y0 = max(cx - half, 0), max(cy - half, 0)
        x1, y1 = min(cx + half, size), min(cy + half, size)
        alpha = np.asarray(spot, np.float32)[y0 - cy + half : y1 - cy + half, x0 - cx + half : x1 - cx + half]
        alpha = (alpha / 255.0 * rng.uniform(0.5, 0.9))[..., None]
        colour = np.array(tone(25, 50), np.float32)
        result[y0:y1, x0:x1] = result[y0:y1, x0:x1] * (1 - alpha) + colour * alpha
    return result


def _shape_polygons(
    name: str, rng: np.random.Generator, extent: float, centre: np.ndarray
) -> list[np.ndarray]:
    polygons = _unit_shape(name, rng)
    aspect = math.exp(rng.uniform(math.log(0.7), math.log(1.45)))
    theta = math.radians(rng.uniform(0, _ROTATION_PERIOD[name]))
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    polygons = [(p * [1.0, aspect]) @ rotation.T for p in polygons]
    span = np.ptp(polygons[0], axis=0).max()
    return [p * (extent / span) + centre for p in polygons]


def _rasterise(polygons: list[np.ndarray], size: int, outline: int) -> tuple[int, int, np.ndarray] | None:
    """Anti-aliased coverage of the polygons inside the image, as (x0, y0, alpha)."""
    lo = np.floor(polygons[0].min(axis=0)).astype(int) - outline - 1
    hi = np.ceil(polygons[0].max(axis=0)).astype(int) + outline + 1
    x0, y0 = max(int(lo[0]), 0), max(int(lo[1]), 0)
    x1, y1 = min(int(hi[0]), size), min(int(hi[1]), size)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    ss = _SUPERSAMPLE
    mask = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
    draw = ImageDraw.Draw(mask)
    offset = np.array([x0, y0], float)
    for i, polygon in enumerate(polygons):
        points = [tuple(p) for p in ((polygon - offset) * ss)]
        draw.polygon(points, fill=255 if i == 0 else 0)
    alpha = np.asarray(mask.reduce(ss), np.float32) / 255.0
    return x0, y0, alpha


def _outline_alpha(
    polygons: list[np.ndarray], x0: int, y0: int, shape: tuple[int, int], width: int
) -> np.ndarray:
    ss = _SUPERSAMPLE
    mask = Image.new("L", (shape[1] * ss, shape[0] * ss), 0)
    draw = ImageDraw.Draw(mask)
    offset = np.array([x0, y0], float)
    for polygon in polygons:
        points = [tuple(p) for p in ((polygon - offset) * ss)]
        draw.line(points + [points[0]], fill=255, width=width * ss, joint="curve")
    return np.asarray(mask.reduce(ss), np.float32) / 255.0


def _second_tone(rng: np.random.Generator, colour: np.ndarray) -> np.ndarray:
    """The other colour of a striped / checked / graded fill: same hue, clearly darker or lighter."""
    if colour.mean() > 90:
        return colour * rng.uniform(0.55, 0.75)
    return np.minimum(colour + rng.uniform(45, 80), 255.0)


def _fill(
    rng: np.random.Generator, colour: np.ndarray, other: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    h, w = shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(0, 4)
    if kind == 0:  # solid
        weight = np.zeros((h, w), np.float32)
    elif kind == 1:  # stripes
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(5, 12)
        phase = (xs * math.cos(angle) + ys * math.sin(angle)) * (2 * math.pi / period)
        weight = (np.sin(phase) > 0).astype(np.float32)
    elif kind == 2:  # gradient
        angle = rng.uniform(0, 2 * math.pi)
        proj = xs * math.cos(angle) + ys * math.sin(angle)
        weight = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
    else:  # checks
        period = int(rng.integers(4, 9))
        weight = (((xs // period) + (ys // period)) % 2).astype(np.float32)
    fill = colour + weight[..., None] * (other - colour)
    return fill + rng.normal(0, 3.0, (h, w, 1)).astype(np.float32)


def _pick_colour(
    rng: np.random.Generator, background: np.ndarray, below: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Two fill tones far (in RGB) from the background mean under the object and from the tones of
    the objects it overlaps, so that it stands out from both."""
    best, best_score = None, -1.0
    for _ in range(16):
        if rng.uniform() < 0.8:
            colour = _hsv_to_rgb(rng.uniform(), rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0))
        else:
            colour = np.full(3, rng.choice([rng.uniform(10, 50), rng.uniform(215, 250)]), np.float32)
        other = _second_tone(rng, colour)
        score = min(
            [float(np.linalg.norm(colour - background)) / 120.0]
            + [float(np.linalg.norm(tone - taken)) / 90.0 for tone in (colour, other) for taken in below]
        )
        if score >= 1.0:
            return colour, other
        if score > best_score:
            best, best_score = (colour, other), score
    assert best is not None
    return best


def _overlap(a: _Placed, x0: int, y0: int, h: int, w: int) -> tuple[slice, slice, slice, slice] | None:
    ax1, ay1 = a.x0 + a.alpha.shape[1], a.y0 + a.alpha.shape[0]
    ix0, iy0, ix1, iy1 = max(a.x0, x0), max(a.y0, y0), min(ax1, x0 + w), min(ay1, y0 + h)
    if ix0 >= ix1 or iy0 >= iy1:
        return None
    return (
        slice(iy0 - a.y0, iy1 - a.y0),
        slice(ix0 - a.x0, ix1 - a.x0),
        slice(iy0 - y0, iy1 - y0),
        slice(ix0 - x0, ix1 - x0),
    )


def _sample_extent(rng: np.random.Generator) -> float:
    u = rng.uniform()
    if u < _P_TINY:
        return rng.uniform(0.04, TINY_FRACTION)
    if u < _P_TINY + _P_SMALL:
        return rng.uniform(TINY_FRACTION, 0.14)
    return math.exp(rng.uniform(math.log(0.14), math.log(0.70)))


def render_image(seed: int, index: int, image_size: int = 300) -> tuple[np.ndarray, list[SynthObject]]:
    """Image ``index`` of the dataset with ``seed``: uint8 RGB ``(S, S, 3)`` and its objects."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, index)))
    size = image_size
    image = _clutter(_background(rng, size), rng)
    background = image.copy()

    count = int(rng.integers(1, 7))
    extents = [_sample_extent(rng) for _ in range(count)]
    if rng.uniform() < 0.7:  # mostly large first, so small objects sit on top of big ones
        extents.sort(reverse=True)
    placed: list[_Placed] = []
    for extent_fraction in extents:
        name = SYNTH_CLASSES[1 + int(rng.integers(0, len(SYNTH_CLASSES) - 1))]
        extent = extent_fraction * size
        outline = int(rng.integers(1, 3)) if rng.uniform() < 0.35 else 0
        for _attempt in range(8):
            margin = 0.1 * extent
            centre = rng.uniform(extent / 2 - margin, size - extent / 2 + margin, 2)
            polygons = _shape_polygons(name, rng, extent, centre)
            raster = _rasterise(polygons, size, outline)
            if raster is None:
                continue
            x0, y0, alpha = raster
            edge = _outline_alpha(polygons, x0, y0, alpha.shape, outline) if outline else None
            if edge is not None:
                alpha = np.maximum(alpha, edge)
            full_area = _polygon_area(polygons[0]) - sum(_polygon_area(p) for p in polygons[1:])
            if float(alpha.sum()) < _MIN_IN_IMAGE * full_area:
                continue
            h, w = alpha.shape
            if not _keeps_visible(placed, x0, y0, alpha):
                continue
            break
        else:
            continue
        region = image[y0 : y0 + h, x0 : x0 + w]
        weights = alpha[..., None]
        under = (background[y0 : y0 + h, x0 : x0 + w] * weights).sum(axis=(0, 1)) / max(
            float(alpha.sum()), 1e-6
        )
        below = [tone for other in placed if _covers(other, x0, y0, alpha) for tone in other.tones]
        colour, second = _pick_colour(rng, under, below)
        fill = _fill(rng, colour, second, (h, w))
        if edge is not None:
            dark = colour * 0.35 if colour.mean() > 70 else colour + 120
            fill = fill * (1 - edge[..., None]) + dark * edge[..., None]
        image[y0 : y0 + h, x0 : x0 + w] = region * (1 - weights) + fill * weights
        for other in placed:
            overlap = _overlap(other, x0, y0, h, w)
            if overlap is not None:
                oy, ox, ny, nx = overlap
                other.visible[oy, ox] *= 1.0 - alpha[ny, nx]
        placed.append(_Placed(name, x0, y0, alpha, alpha.copy(), full_area, (colour, second)))

    objects = []
    for item in placed:
        rows, cols = np.nonzero(item.visible >= _VISIBLE_WEIGHT)
        if rows.size == 0:
            continue
        xmin, xmax = item.x0 + int(cols.min()), item.x0 + int(cols.max())
        ymin, ymax = item.y0 + int(rows.min()), item.y0 + int(rows.max())
        visible_fraction = min(float(item.visible.sum()) / item.full_area, 1.0)
        in_image = min(float(item.alpha.sum()) / item.full_area, 1.0)
        tiny = max(xmax - xmin + 1, ymax - ymin + 1) < TINY_FRACTION * size
        objects.append(
            SynthObject(
                name=item.name,
                box=(xmin + 1, ymin + 1, xmax + 1, ymax + 1),
                difficult=tiny or visible_fraction < 1.0 - _DIFFICULT_HIDDEN,
                truncated=in_image < 0.98,
                visible_fraction=round(visible_fraction, 4),
            )
        )
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), objects


def _covers(other: _Placed, x0: int, y0: int, alpha: np.ndarray) -> bool:
    """Whether a new object at ``(x0, y0)`` would be drawn over a visible part of ``other``."""
    overlap = _overlap(other, x0, y0, *alpha.shape)
    if overlap is None:
        return False
    oy, ox, ny, nx = overlap
    return float((other.visible[oy, ox] * alpha[ny, nx]).sum()) > 4.0


def _keeps_visible(placed: list[_Placed], x0: int, y0: int, alpha: np.ndarray) -> bool:
    h, w = alpha.shape
    for other in placed:
        overlap = _overlap(other, x0, y0, h, w)
        if overlap is None:
            continue
        oy, ox, ny, nx = overlap
        covered = float((other.visible[oy, ox] * alpha[ny, nx]).sum())
        if float(other.visible.sum()) - covered < (1.0 - _MAX_HIDDEN) * other.full_area:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Files


def _annotation_xml(stem: str, size: int, objects: Sequence[SynthObject]) -> str:
    parts = [
        "<annotation>",
        f"\t<folder>{FOLDER_NAME}</folder>",
        f"\t<filename>{stem}.jpg</filename>",
        "\t<source>",
        f"\t\t<database>qcompress synthetic shapes ({GENERATOR_VERSION})</database>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{size}</width>",
        f"\t\t<height>{size}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        "\t<segmented>0</segmented>",
    ]
    for obj in objects:
        xmin, ymin, xmax, ymax = obj.box
        parts += [
            "\t<object>",
            f"\t\t<name>{obj.name}</name>",
            "\t\t<pose>Unspecified</pose>",
            f"\t\t<truncated>{int(obj.truncated)}</truncated>",
            f"\t\t<difficult>{int(obj.difficult)}</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{xmin}</xmin>",
            f"\t\t\t<ymin>{ymin}</ymin>",
            f"\t\t\t<xmax>{xmax}</xmax>",
            f"\t\t\t<ymax>{ymax}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"


def _stem(index: int) -> str:
    return f"{index:06d}"


def _write_image(year_dir: Path, seed: int, index: int, image_size: int) -> None:
    pixels, objects = render_image(seed, index, image_size)
    stem = _stem(index)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    (year_dir / "JPEGImages" / f"{stem}.jpg").write_bytes(buffer.getvalue())
    (year_dir / "Annotations" / f"{stem}.xml").write_text(
        _annotation_xml(stem, image_size, objects), encoding="utf-8"
    )


def _write_range(year_dir: str, seed: int, start: int, stop: int, image_size: int) -> int:
    for index in range(start, stop):
        _write_image(Path(year_dir), seed, index, image_size)
    return stop - start


def _split_ids(num_images: int, seed: int, splits: Sequence[float]) -> dict[str, list[str]]:
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,))).permutation(num_images)
    n_train = round(splits[0] * num_images)
    n_val = min(round(splits[1] * num_images), num_images - n_train)
    parts = {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }
    parts["trainval"] = np.concatenate([parts["train"], parts["val"]])
    return {name: [_stem(int(i)) for i in sorted(ids)] for name, ids in parts.items()}


def _default_workers(num_images: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, 8, num_images // 200))


def generate_voc_dataset(
    out_dir: Path | str,
    num_images: int = 3000,
    seed: int = 0,
    image_size: int = 300,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
    workers: int | None = None,
) -> Path:
    """Write the synthetic dataset under ``out_dir`` and return its year folder ``out_dir/SYNTH``.

    Layout: ``out_dir/labels.txt`` (``SYNTH_CLASSES``), ``out_dir/synth.json`` (the parameters),
    ``out_dir/SYNTH/{JPEGImages,Annotations,ImageSets/Main/{train,val,trainval,test}.txt}``.
    The same arguments give byte-identical files for any ``workers`` (default: one process per
    200 images, at most one per CPU).
    """
    out_dir = Path(out_dir).expanduser()
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise QCompressError(f"number of synthetic images must be >= 1, got {num_images!r}", "pass e.g. 3000")
    if not isinstance(image_size, int) or image_size < 64:
        raise QCompressError(
            f"synthetic image size must be an integer >= 64, got {image_size!r}", "pass e.g. 300"
        )
    if len(splits) != 3 or min(splits) < 0 or abs(sum(splits) - 1.0) > 1e-6:
        raise QCompressError(
            f"splits must be three non-negative fractions summing to 1, got {tuple(splits)}",
            "pass e.g. (0.8, 0.1, 0.1) for train, val, test",
        )
    year_dir = out_dir / FOLDER_NAME
    if year_dir.exists() and any(year_dir.iterdir()):
        raise QCompressError(
            f"synthetic dataset folder is not empty: {year_dir}",
            "choose a new folder or delete the old dataset",
        )
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (year_dir / sub).mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    workers = _default_workers(num_images) if workers is None else max(1, int(workers))
    if workers == 1:
        _write_range(str(year_dir), seed, 0, num_images, image_size)
    else:
        chunk = max(1, min(100, math.ceil(num_images / (workers * 4))))
        starts = range(0, num_images, chunk)
        # spawn, not fork: the caller may hold torch / OpenMP threads that a fork would copy mid-state
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            futures = [
                pool.submit(_write_range, str(year_dir), seed, s, min(s + chunk, num_images), image_size)
                for s in starts
            ]
            for future in futures:
                future.result()

    for name, ids in _split_ids(num_images, seed, splits).items():
        (year_dir / "ImageSets" / "Main" / f"{name}.txt").write_text(
            "".join(f"{i}\n" for i in ids), encoding="utf-8"
        )
    (out_dir / "labels.txt").write_text("\n".join(SYNTH_CLASSES) + "\n", encoding="utf-8")
    manifest = {
        "generator": GENERATOR_VERSION,
        "num_images": num_images,
        "seed": seed,
        "image_size": image_size,
        "splits": list(splits),
        "classes": list(SYNTH_CLASSES),
    }
    (out_dir / "synth.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log.info(
        "generated %d synthetic images in %s (%.1f s, %d workers)",
        num_images,
        year_dir,
        time.perf_counter() - started,
        workers,
    )
    return year_dir


def default_dataset_dir(num_images: int = 3000, seed: int = 0) -> Path:
    """Cache folder of the default dataset: ``$QCOMPRESS_CACHE`` or ``~/.cache/qcompress``, + ``synth-v1``.

    Non-default parameters get their own folder (``synth-v1-n<images>-s<seed>``).
    """
    cache = os.environ.get("QCOMPRESS_CACHE")
    root = Path(cache).expanduser() if cache else Path.home() / ".cache" / "qcompress"
    name = (
        GENERATOR_VERSION if (num_images, seed) == (3000, 0) else f"{GENERATOR_VERSION}-n{num_images}-s{seed}"
    )
    return root / name


def ensure_default_dataset(num_images: int = 3000, seed: int = 0) -> Path:
    """The default dataset's year folder, generated on first use and reused after.

    Generation writes into a temporary folder beside the cache folder and renames it into place,
    so an interrupted run never leaves a half-written dataset behind.
    """
    final = default_dataset_dir(num_images, seed)
    if (final / "synth.json").is_file() and (final / FOLDER_NAME).is_dir():
        return final / FOLDER_NAME
    if final.exists():
        raise QCompressError(
            f"incomplete synthetic dataset in the cache: {final}", "delete the folder and run again"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        generate_voc_dataset(tmp, num_images=num_images, seed=seed)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "synth.json").is_file():  # not a concurrent run that finished first
                raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return final / FOLDER_NAME


class RenderedSplit:
    """The first ``count`` images of a split of the generated dataset, rendered in memory.

    Pixels go through the same JPEG round trip as the files on disk, so a model sees what it would
    read from the generated folder; reading the whole 3,000-image dataset is not needed (tests).
    Implements the DetectionDataset contract.
    """

    def __init__(self, split: str, count: int, seed: int = 0, num_images: int = 3000, image_size: int = 300) -> None:
        self.class_names = SYNTH_CLASSES
        ids = _split_ids(num_images, seed, (0.8, 0.1, 0.1))[split][:count]
        self._ids = ids
        self._items = []
        for stem in ids:
            pixels, objects = render_image(seed, int(stem), image_size)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=_JPEG_QUALITY)
            buffer.seek(0)
            image = np.asarray(Image.open(buffer).convert("RGB")).copy()
            boxes = np.array([[o.box[0] - 1, o.box[1] - 1, o.box[2], o.box[3]] for o in objects], np.float32).reshape(-1, 4)
            labels = np.array([SYNTH_CLASSES.index(o.name) for o in objects], np.int64)
            difficult = np.array([o.difficult for o in objects], bool)
            self._items.append((image, boxes, labels, difficult))

    def __len__(self) -> int:
        return len(self._items)

    def image_id(self, index: int) -> str:
        return f"{FOLDER_NAME}/{self._ids[index]}"

    def load_image(self, index: int) -> np.ndarray:
        return self._items[index][0]

    def image_size(self, index: int) -> tuple[int, int]:
        return tuple(self._items[index][0].shape[:2])

    def annotation(self, index: int):
        from qcompress.data.dataset import Annotation

        _, boxes, labels, difficult = self._items[index]
        return Annotation(boxes, labels, difficult)
