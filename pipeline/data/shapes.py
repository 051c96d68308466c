"""`shapes`: an embedded image dataset whose label is an object's shape and whose pixels are mostly not.

Why it exists: the embedded digits (8x8 pixels upscaled) hold too little image for masked-image
modelling to learn from, so an SSL-vs-supervised comparison on them says nothing either way
(docs/ABLATIONS.md). Here every image is a textured photo background with one large object of one of
ten shapes, at a random position, scale, rotation and colour, with clutter behind it and occluders in
front of it. The label is the shape: colour, position, size and background carry no information about
it (tests/data/test_data_shapes.py checks that colour/intensity statistics stay near chance), so a
model must learn edges, corners and their arrangement, the structure MIM is meant to pick up.

Generated, not downloaded: image ``i`` of a split is drawn from its own ``numpy`` generator seeded by
``(seed, split, i)``, so a sample renders the same wherever a writer task reads it, and the same seed
gives the same bytes (PNG, lossless). Labels are ``i % 10``: exactly balanced; the shard writer
shuffles the order. Backgrounds are random crops (random box, flip, quarter turn) of the two photos
scikit-learn ships (``sklearn.datasets.load_sample_images``: china.jpg, flower.jpg), which are on disk
wherever the pipeline is installed. Shapes are drawn as polygons at 4x the output size and reduced
with a Lanczos filter (anti-aliased edges).
"""

from __future__ import annotations

import functools
import io
import math
from typing import Any

import numpy as np

CLASSES = ("circle", "triangle", "square", "star", "cross", "ring", "crescent", "arrow", "ell", "heart")
IMAGE_SIZE = 64
SEED = 0
COUNTS = {"train": 4000, "val": 1000}
SUPERSAMPLE = 4  # polygons are drawn at 4x and reduced: anti-aliased edges without a rasteriser of our own
SPLIT_IDS = {"train": 1, "val": 2}  # part of every image's seed: the splits never share an image

# object radius (the shape's circumscribed circle) as a fraction of the image side
RADIUS = (0.28, 0.45)
MIN_CONTRAST = 120.0  # RGB distance between object colour and the background under it, else inverted


# --------------------------------------------------------------------------- shape outlines


def _circle(radius: float, n: int = 48, center: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([center[0] + radius * np.cos(t), center[1] + radius * np.sin(t)], axis=1)


def _regular(n: int, radius: float = 1.0) -> np.ndarray:
    return _circle(radius, n)[:, ::-1]  # a vertex at the top rather than on the right


def _star(points: int = 5, outer: float = 1.0, inner: float = 0.42) -> np.ndarray:
    t = np.arange(2 * points) * math.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([r * np.sin(t), -r * np.cos(t)], axis=1)


def _heart(n: int = 60) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], axis=1)
    return pts / np.abs(pts).max() * 0.95


def _outline(name: str) -> list[tuple[np.ndarray, bool]]:
    """Polygons in unit coordinates (circumscribed radius ~1), each with fill=True or a hole (False)."""
    if name == "circle":
        return [(_circle(0.85), True)]
    if name == "triangle":
        return [(_regular(3), True)]
    if name == "square":
        return [(_regular(4) @ _rotation(math.pi / 4).T * 0.95, True)]
    if name == "star":
        return [(_star(), True)]
    if name == "cross":
        a, b = 0.32, 0.95  # half arm width, arm length
        return [(np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a],
                           [-b, a], [-b, -a], [-a, -a]]), True)]
    if name == "ring":
        return [(_circle(0.9), True), (_circle(0.5), False)]
    if name == "crescent":
        return [(_circle(0.9), True), (_circle(0.75, center=(0.42, -0.1)), False)]
    if name == "arrow":
        w, h = 0.22, 0.6  # half shaft width, half head width
        return [(np.array([[-0.95, -w], [0.2, -w], [0.2, -h], [0.95, 0.0], [0.2, h], [0.2, w], [-0.95, w]]), True)]
    if name == "ell":
        return [(np.array([[-0.6, -0.9], [-0.15, -0.9], [-0.15, 0.45], [0.7, 0.45], [0.7, 0.9], [-0.6, 0.9]]), True)]
    if name == "heart":
        return [(_heart(), True)]
    raise ValueError(f"unknown shape {name!r}")


def _rotation(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


# --------------------------------------------------------------------------- backgrounds


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(np.ascontiguousarray(image) for image in load_sample_images().images)


def _background(rng: np.random.Generator, side: int):
    from PIL import Image

    photo = _photos()[int(rng.integers(len(_photos())))]
    height, width = photo.shape[:2]
    box = int(rng.integers(96, min(height, width) // 2 + 1))  # 96..213 px of a 427x640 photo
    top, left = int(rng.integers(height - box + 1)), int(rng.integers(width - box + 1))
    crop = photo[top : top + box, left : left + box]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = np.rot90(crop, int(rng.integers(4)))
    return Image.fromarray(np.ascontiguousarray(crop)).resize((side, side), Image.BILINEAR)


# --------------------------------------------------------------------------- rendering


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.25, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _clutter(draw: Any, rng: np.random.Generator, side: int, count: int, max_size: float) -> None:
    """`count` random strokes and small irregular blobs, none of them one of the class shapes."""
    for _ in range(count):
        colour = _random_colour(rng)
        if rng.random() < 0.5:  # a stroke
            x0, y0 = rng.uniform(0, side, 2)
            length = rng.uniform(0.15, 0.6) * side
            angle = rng.uniform(0, 2 * math.pi)
            end = (x0 + length * math.cos(angle), y0 + length * math.sin(angle))
            draw.line([(x0, y0), end], fill=colour, width=max(1, int(rng.uniform(0.015, 0.05) * side)))
        else:  # a blob: a star-convex polygon with random radii, a few % of the image
            cx, cy = rng.uniform(0, side, 2)
            n = int(rng.integers(5, 9))
            t = np.sort(rng.uniform(0, 2 * math.pi, n))
            r = rng.uniform(0.3, 1.0, n) * rng.uniform(0.04, max_size) * side
            points = [(cx + ri * math.cos(ti), cy + ri * math.sin(ti)) for ri, ti in zip(r, t, strict=True)]
            draw.polygon(points, fill=colour)


def render(label: int, rng: np.random.Generator, size: int = IMAGE_SIZE):
    """One RGB PIL image of class `label` drawn with `rng`."""
    from PIL import Image, ImageDraw

    side = size * SUPERSAMPLE
    canvas = _background(rng, side)
    _clutter(ImageDraw.Draw(canvas), rng, side, int(rng.integers(1, 4)), 0.12)  # behind the object

    radius = rng.uniform(*RADIUS) * side
    aspect = rng.uniform(0.85, 1.15)  # a mild anisotropic stretch
    centre = rng.uniform(radius * 0.8, side - radius * 0.8, 2)  # may touch the border, never leaves
    transform = _rotation(rng.uniform(0, 2 * math.pi)) @ np.diag([radius * aspect, radius / aspect])
    mask = Image.new("L", (side, side), 0)
    pen = ImageDraw.Draw(mask)
    for polygon, fill in _outline(CLASSES[label]):
        points = polygon @ transform.T + centre
        pen.polygon([tuple(p) for p in points], fill=255 if fill else 0)
    colour = np.array(_random_colour(rng), dtype=np.float64)
    under = np.asarray(canvas, dtype=np.float64)[np.asarray(mask) > 0].mean(axis=0)
    if np.linalg.norm(colour - under) < MIN_CONTRAST:
        colour = 255.0 - colour
    canvas.paste(tuple(int(c) for c in colour), (0, 0), mask)

    _clutter(ImageDraw.Draw(canvas), rng, side, int(rng.integers(0, 2)), 0.08)  # occluders in front
    return canvas.resize((size, size), Image.LANCZOS)


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLIT_IDS[split], int(index)])


def label_of(index: int) -> int:
    return index % len(CLASSES)


def png_bytes(seed: int, split: str, index: int, size: int = IMAGE_SIZE) -> bytes:
    """Sample `index` of `split` as PNG bytes (the same bytes for the same arguments)."""
    image = render(label_of(index), image_rng(seed, split, index), size)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def images(seed: int, split: str, count: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` images of a split as uint8 [N, size, size, 3] and their labels (tests, baselines)."""
    pixels = np.stack([np.asarray(render(label_of(i), image_rng(seed, split, i), size)) for i in range(count)])
    return pixels, np.array([label_of(i) for i in range(count)])
