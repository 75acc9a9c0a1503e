"""Render the demo's gallery (`gallery/*.png`) with the embedded scene renderer: six scenes of the default data's
shapes, colours and backgrounds, each named by its caption. Needs dclip (the Space does not: it ships the PNGs).

    python examples/demo/make_gallery.py [--output_dir examples/demo/gallery]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dclip.data.scenes import SceneConfig, SceneObject, render_scene


# caption (the file name) -> background, objects as (shape, colour, size, normalised box)
SCENES = {
    "a large red circle": ("gray", [("circle", "red", "large", (0.31, 0.31, 0.69, 0.69))]),
    "two blue squares": ("sand", [("square", "blue", "medium", (0.1, 0.36, 0.38, 0.64)),
                                  ("square", "blue", "medium", (0.6, 0.36, 0.88, 0.64))]),
    "a green triangle above a yellow star": ("teal", [("triangle", "green", "medium", (0.36, 0.06, 0.64, 0.34)),
                                                      ("star", "yellow", "medium", (0.36, 0.6, 0.64, 0.88))]),
    "a purple hexagon": ("pink", [("hexagon", "purple", "large", (0.31, 0.31, 0.69, 0.69))]),
    "an orange diamond to the left of a white star": (
        "gray", [("diamond", "orange", "medium", (0.08, 0.36, 0.36, 0.64)),
                 ("star", "white", "medium", (0.62, 0.36, 0.9, 0.64))]),
    "three black circles": ("sand", [("circle", "black", "small", (0.1, 0.4, 0.3, 0.6)),
                                     ("circle", "black", "small", (0.4, 0.4, 0.6, 0.6)),
                                     ("circle", "black", "small", (0.7, 0.4, 0.9, 0.6))]),
}


def render_gallery(output_dir: Path, image_size: int | None = None, noise_std: float | None = None) -> list[Path]:
    """Write each scene of `SCENES` as `<caption with underscores>.png`; the embedded default's size and pixel noise
    unless given, a fixed random stream per scene. Returns the files."""
    config = SceneConfig()
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (caption, (background, specs)) in enumerate(SCENES.items()):
        objects = [SceneObject(shape, color, size, box) for shape, color, size, box in specs]
        rng = np.random.default_rng([config.seed, index])
        png = render_scene(objects, background, image_size or config.image_size,
                           config.noise_std if noise_std is None else noise_std, rng, config.supersample)
        path = output_dir / (caption.replace(" ", "_") + ".png")
        path.write_bytes(png)
        paths.append(path)
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path(__file__).resolve().parent / "gallery")
    for path in render_gallery(parser.parse_args().output_dir):
        print(f"{path} ({path.stat().st_size / 1024:.1f} KB)")
