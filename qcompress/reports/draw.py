"""Detections drawn on images: boxes, ``class score`` labels, one colour per class, side-by-side panels."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from qcompress.models.detector import Detections

Colour = tuple[int, int, int]
_GOLDEN = 0.618033988749895


def class_colour(label: int) -> Colour:
    """A saturated colour for class ``label``; consecutive labels get far-apart hues (golden-ratio steps)."""
    hue = (0.07 + label * _GOLDEN) % 1.0
    value = 1.0 if label % 2 else 0.85
    r, g, b = colorsys.hsv_to_rgb(hue, 0.9, value)
    return int(r * 255), int(g * 255), int(b * 255)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font, fixed size
        return ImageFont.load_default()


def _as_image(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")


def _text_colour(background: Colour) -> Colour:
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luminance > 150 else (255, 255, 255)


def draw_boxes(
    image: Image.Image | np.ndarray,
    boxes: np.ndarray | Sequence[Sequence[float]],
    labels: Sequence[int],
    class_names: Sequence[str],
    scores: Sequence[float] | None = None,
    line_width: int | None = None,
) -> Image.Image:
    """A copy of ``image`` with each ``(x1, y1, x2, y2)`` pixel box outlined in its class colour and
    labelled ``class score`` (or ``class`` when ``scores`` is None) on a filled tag at its top-left."""
    canvas = _as_image(image).copy()
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    line_width = line_width or max(2, round(min(width, height) / 150))
    font = _font(max(10, round(min(width, height) / 28)))
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    # Lowest scores first, so the most confident box and tag end up on top.
    order = np.argsort(np.asarray(scores, dtype=np.float64)) if scores is not None else np.arange(len(boxes))
    for i in order:
        label = int(labels[i])
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        x1, x2 = max(0.0, min(x1, x2)), min(width - 1.0, max(x1, x2))
        y1, y2 = max(0.0, min(y1, y2)), min(height - 1.0, max(y1, y2))
        if x2 < x1 or y2 < y1:
            continue
        colour = class_colour(label)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line_width)
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        text = f"{name} {float(scores[i]):.2f}" if scores is not None else name
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 4, bottom - top + 4
        # Tag above the box when there is room, else just inside its top edge.
        ty = y1 - th if y1 - th >= 0 else y1
        tx = min(x1, max(0.0, width - tw))
        draw.rectangle((tx, ty, tx + tw, ty + th), fill=colour)
        draw.text((tx + 2 - left, ty + 2 - top), text, fill=_text_colour(colour), font=font)
    return canvas


def draw_detections(
    image: Image.Image | np.ndarray,
    detections: Detections,
    class_names: Sequence[str],
    score_threshold: float = 0.0,
    line_width: int | None = None,
) -> Image.Image:
    """``image`` with the detections scoring at least ``score_threshold`` drawn on it."""
    keep = detections.scores >= score_threshold
    return draw_boxes(
        image,
        detections.boxes[keep].detach().cpu().numpy(),
        detections.labels[keep].tolist(),
        class_names,
        detections.scores[keep].tolist(),
        line_width,
    )


def side_by_side(panels: Sequence[Image.Image], titles: Sequence[str], gap: int = 8) -> Image.Image:
    """Panels in one row on white, each under its title, top-aligned."""
    if len(panels) != len(titles):
        raise ValueError("one title per panel")
    panels = [_as_image(p) for p in panels]
    height = max(p.height for p in panels)
    font = _font(max(12, round(height / 22)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_h = max(probe.textbbox((0, 0), t or " ", font=font)[3] for t in titles) + 8
    total_w = sum(p.width for p in panels) + gap * (len(panels) + 1)
    sheet = Image.new("RGB", (total_w, height + title_h + gap * 2), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    x = gap
    for panel, title in zip(panels, titles):
        left, _, right, _ = draw.textbbox((0, 0), title, font=font)
        draw.text((x + max(0, (panel.width - (right - left)) // 2) - left, gap), title, fill=(0, 0, 0), font=font)
        sheet.paste(panel, (x, gap + title_h))
        x += panel.width + gap
    return sheet


__all__ = ["class_colour", "draw_boxes", "draw_detections", "side_by_side"]
