"""Rendering one scene: its objects drawn on a plain background at a supersampled size, box-filtered down,
with Gaussian pixel noise, as PNG bytes (`render_scene`)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from .compose import SceneObject, _shape_points
from .config import BACKGROUNDS, COLORS


def render_scene(objects: list[SceneObject], background: str, size: int, noise_std: float, rng: np.random.Generator,
                 supersample: int = 2) -> bytes:
    """PNG bytes of the scene."""
    big = size * supersample
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[background])
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        points = _shape_points(obj.shape, obj.box, big)
        if points is None:
            draw.ellipse([v * big for v in obj.box], fill=COLORS[obj.color])
        else:
            draw.polygon(points, fill=COLORS[obj.color])
    image = canvas.resize((size, size), Image.Resampling.BOX) if supersample > 1 else canvas
    array = np.asarray(image, dtype=np.int16)
    if noise_std > 0:
        array = array + rng.normal(0.0, noise_std, size=array.shape).round().astype(np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
