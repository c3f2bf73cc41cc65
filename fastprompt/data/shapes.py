"""The shape world: its vocabulary and its renderers, shared by every generated image.

One module draws every synthetic image of the project, and imports nothing of it:

- `draw_shape` draws one object on a 64 px canvas for the ``builtin`` dataset (`builtin.py`);
- `render` draws a scene of 1–3 objects, the way the `tiny` CLIP's pretraining corpus
  (`fastprompt.pretrain.corpus`) and the downstream generated datasets (`generated.py`) see it;
- `describe` names a scene ("two striped red triangles"), for captions and class names;
- `HELD_OUT` lists the colour–shape pairs the pretraining corpus never shows (the generated
  datasets use them to test composition).

Every function draws from the NumPy generator it is given, in a fixed order, so an image is a pure
function of that generator's seed.
"""
from __future__ import annotations

import math

import numpy as np

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 220, 40),
    "purple": (140, 40, 180), "orange": (245, 140, 20), "pink": (245, 120, 190),
    "brown": (130, 80, 35), "black": (15, 15, 15), "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "hexagon", "heart",
          "arrow")
PLURAL = {s: s + ("es" if s.endswith(("s", "x", "ch")) else "s") for s in SHAPES}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
#: object radius as a fraction of the image side, per size word (scenes of one object)
SIZES = {"small": (0.17, 0.24), "large": (0.32, 0.42)}
TEXTURES = ("plain", "striped")
#: colour–shape pairs never shown in pretraining (one per colour, no shape twice)
HELD_OUT = tuple((c, SHAPES[(3 * i + 2) % len(SHAPES)]) for i, c in enumerate(COLOURS))


def outline(shape: str) -> list[tuple[float, float]]:
    """Unit-radius outline of a polygonal shape, centred on the origin."""
    if shape in ("square", "triangle", "hexagon"):
        k = {"square": 4, "triangle": 3, "hexagon": 6}[shape]
        return [(math.cos(2 * math.pi * i / k), math.sin(2 * math.pi * i / k)) for i in range(k)]
    if shape == "star":
        return [((1.0 if i % 2 == 0 else 0.42) * math.cos(math.pi * i / 5 - math.pi / 2),
                 (1.0 if i % 2 == 0 else 0.42) * math.sin(math.pi * i / 5 - math.pi / 2))
                for i in range(10)]
    if shape == "cross":
        a, b = 0.33, 1.0
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a),
                (-b, a), (-b, -a), (-a, -a)]
    if shape == "diamond":
        return [(0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)]
    if shape == "heart":
        pts = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17, -y / 17))
        return pts
    if shape == "arrow":
        return [(-1.0, -0.25), (0.2, -0.25), (0.2, -0.6), (1.0, 0.0), (0.2, 0.6), (0.2, 0.25),
                (-1.0, 0.25)]
    raise ValueError(f"unknown shape {shape!r}")


def _canvas(rng: np.random.Generator, size: int, tones: tuple[int, int], noise: float):
    """A `size` x `size` background: one random tone per channel from `tones`, plus pixel noise."""
    from PIL import Image

    pixels = rng.integers(*tones, size=3) + rng.normal(0.0, noise, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _object(draw, rng: np.random.Generator, shape: str, cx: float, cy: float, r: float, fill,
            ring_div: float, tilt: float) -> None:
    """One object of radius `r` centred on (cx, cy): a circle, a ring `r / ring_div` thick, or the
    outline of a polygonal shape turned by a random angle (a heart only by +-`tilt` radians, so
    it stays upright)."""
    if shape in ("circle", "ring"):
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        else:
            draw.ellipse(box, outline=fill, width=max(2, int(r / ring_div)))
        return
    angle = rng.uniform(0, 2 * math.pi) if shape != "heart" else rng.uniform(-tilt, tilt)
    cos, sin = math.cos(angle), math.sin(angle)
    draw.polygon([(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos))
                  for x, y in outline(shape)], fill=fill)


def draw_shape(rng: np.random.Generator, colour, shape: str, size: int = 64):
    """One object (the ``builtin`` dataset): noisy mid-tone background, jittered colour, random
    position, size and rotation."""
    from PIL import ImageDraw

    image = _canvas(rng, size, tones=(70, 190), noise=18.0)
    fill = tuple(int(c) for c in np.clip(np.asarray(colour) + rng.integers(-25, 26, 3), 0, 255))
    r = rng.uniform(0.18, 0.38) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    _object(ImageDraw.Draw(image), rng, shape, cx, cy, r, fill, ring_div=3, tilt=0.5)
    return image


def describe(colour: str, shape: str, count: int = 1, texture: str | None = None,
             size: str | None = None, count_word: bool | None = None) -> str:
    """The noun phrase of a scene: '[count] [size] [texture] colour shape(s)'."""
    words = []
    if count > 1 or count_word:
        words.append(COUNT_WORDS[count])
    words += [w for w in (size, texture) if w]
    words += [colour, PLURAL[shape] if count > 1 else shape]
    return " ".join(words)


def render(rng: np.random.Generator, colour: str, shape: str, count: int = 1,
           texture: str = "plain", size: str = "large", image_size: int = 32):
    """A scene (PIL RGB image): `count` objects of one kind, non-overlapping when possible."""
    from PIL import Image, ImageDraw

    s = image_size
    image = _canvas(rng, s, tones=(60, 200), noise=14.0)
    lo, hi = SIZES["small"] if count > 1 else SIZES[size]
    if count > 1:
        lo, hi = 0.12, 0.16
    placed: list[tuple[float, float, float]] = []
    for _ in range(count):
        r = rng.uniform(lo, hi) * s
        for _try in range(20):
            cx, cy = rng.uniform(r, s - r, size=2)
            if all(math.hypot(cx - x, cy - y) > r + q + 1 for x, y, q in placed):
                break
        placed.append((cx, cy, r))
        fill = tuple(int(c) for c in np.clip(np.asarray(COLOURS[colour]) + rng.integers(-20, 21, 3),
                                             0, 255))
        mask = Image.new("L", (s, s), 0)
        _object(ImageDraw.Draw(mask), rng, shape, cx, cy, r, 255, ring_div=2.5, tilt=0.4)
        layer = Image.new("RGB", (s, s), fill)
        if texture == "striped":
            dark = tuple(int(c * 0.25 + 255 * 0.05) if sum(fill) > 200 else 235 for c in fill)
            stripes = Image.new("RGB", (s, s), dark)
            period = 4
            angle = rng.integers(0, 2)
            yy, xx = np.mgrid[0:s, 0:s]
            on = ((xx if angle else yy) % period) < period // 2
            arr = np.where(on[..., None], np.asarray(fill), np.asarray(stripes))
            layer = Image.fromarray(arr.astype(np.uint8), "RGB")
        image.paste(layer, (0, 0), mask)
    return image
