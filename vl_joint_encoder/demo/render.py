"""Drawing of toy-world entities with PIL: a canonical image per entity and jittered "photos" of it.

An entity's look is a small composition of coloured shapes (its *sigil*): 2-3 shapes, each with a shape kind, a fill
colour, a position and a size on a neutral canvas, and optionally a stripe texture. A *rendering* draws the same sigil
under a random similarity transform (rotation, scale, shift), on a randomly tinted background, with pixel noise: the
look stays recognisable, but no two renderings are the same picture, so a retriever must recognise the composition
instead of matching pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


SHAPE_KINDS = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "hexagon")
# Saturated colours that stay distinct after down-sampling; names are for captions only (never in passages).
PALETTE = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 215, 30),
    "green": (40, 170, 60),
    "teal": (20, 160, 160),
    "blue": (40, 80, 220),
    "purple": (140, 50, 190),
    "pink": (240, 110, 180),
    "brown": (130, 80, 40),
    "black": (25, 25, 25),
}
CANONICAL_BACKGROUND = (235, 235, 235)


@dataclass(frozen=True)
class Shape:
    """One element of a sigil; centre and radius are fractions of the canvas side."""

    kind: str
    color: str
    center: tuple[float, float]
    radius: float
    striped: bool = False


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of circumradius r centred on (cx, cy), rotated by `angle` radians."""
    if kind == "square":
        points = [(math.pi / 4 + k * math.pi / 2, r) for k in range(4)]
    elif kind == "triangle":
        points = [(-math.pi / 2 + k * 2 * math.pi / 3, r) for k in range(3)]
    elif kind == "diamond":
        points = [(k * math.pi / 2, r if k % 2 == 0 else 0.6 * r) for k in range(4)]
    elif kind == "star":
        points = [(-math.pi / 2 + k * math.pi / 5, r if k % 2 == 0 else 0.45 * r) for k in range(10)]
    elif kind == "hexagon":
        points = [(k * math.pi / 3, r) for k in range(6)]
    elif kind == "cross":
        w = 0.35 * r
        corners = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w),
                   (-w, r)]
        points = [(math.atan2(y, x), math.hypot(x, y)) for x, y in corners]
    else:
        raise ValueError(f"unknown polygon kind {kind!r}")
    return [(cx + rho * math.cos(theta + angle), cy + rho * math.sin(theta + angle)) for theta, rho in points]


def _draw_shape(image: Image.Image, shape: Shape, cx: float, cy: float, r: float, angle: float) -> None:
    """Draw one shape in pixel coordinates onto `image` (RGB), with its stripe texture if any."""
    fill = PALETTE[shape.color]
    mask = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(mask)
    if shape.kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape.kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        inner = 0.55 * r
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    else:
        draw.polygon(_polygon(shape.kind, cx, cy, r, angle), fill=255)
    layer = Image.new("RGB", image.size, fill)
    if shape.striped:
        # white stripes across the shape, rotating with it
        stripes = ImageDraw.Draw(layer)
        period = max(2.0, r / 2.5)
        ux, uy = math.cos(angle + math.pi / 4), math.sin(angle + math.pi / 4)
        for k in range(-8, 9):
            ox, oy = cx + k * period * ux, cy + k * period * uy
            stripes.line([(ox - 3 * r * uy, oy + 3 * r * ux), (ox + 3 * r * uy, oy - 3 * r * ux)],
                         fill=(250, 250, 250), width=max(1, int(period / 3)))
    image.paste(layer, (0, 0), mask)


def render_sigil(
    shapes: tuple[Shape, ...],
    size: int,
    rng: np.random.Generator | None = None,
    supersample: int = 4,
) -> Image.Image:
    """
    Draw a sigil as a `size x size` RGB image. With `rng=None` the canonical image (no transform, neutral background,
    no noise); with a generator, a jittered rendering: rotation +-30 degrees, scale 0.8-1.1, shift +-10% of the side,
    a random light background tint, a slight blur and Gaussian pixel noise (sigma 8 / 255).
    """
    if size < 8:
        raise ValueError(f"image size must be at least 8 pixels, got {size}")
    big = size * supersample
    if rng is None:
        angle, scale, shift, background = 0.0, 1.0, (0.0, 0.0), CANONICAL_BACKGROUND
    else:
        angle = math.radians(rng.uniform(-30, 30))
        scale = rng.uniform(0.8, 1.1)
        shift = tuple(rng.uniform(-0.1, 0.1, size=2))
        background = tuple(int(c) for c in rng.integers(190, 256, size=3))
    image = Image.new("RGB", (big, big), background)
    cos, sin = math.cos(angle), math.sin(angle)
    for shape in shapes:
        # rotate/scale the shape centre about the canvas centre, then shift
        dx, dy = shape.center[0] - 0.5, shape.center[1] - 0.5
        x = 0.5 + scale * (cos * dx - sin * dy) + shift[0]
        y = 0.5 + scale * (sin * dx + cos * dy) + shift[1]
        _draw_shape(image, shape, x * big, y * big, shape.radius * scale * big, angle)
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    if rng is not None:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 0.6))))
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 8.0, size=(size, size, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image


__all__ = ["PALETTE", "SHAPE_KINDS", "Shape", "render_sigil"]
