"""Reading one image file into 8-bit RGB, with the work per image bounded.

* Modes: every mode Pillow opens ends as the RGB an 8-bit file of the same picture would give.
  16-bit grey (`I;16`, `I;16B`, ...; 16-bit PNGs) and 32-bit integer (`I`) pixels are *scaled*
  to 0..255 (v / 257, so 8-bit data stored as 16-bit comes back exactly), not clipped to white as
  `convert("RGB")` does; float (`F`) pixels in 0..1 are scaled by 255, in 0..255 kept, in
  0..65535 divided by 257, anything else stretched min..max (NaN -> 0). 16-bit RGB(A) PNGs are
  reduced to 8 bits by Pillow itself. Palette images with transparency go through RGBA first (no
  Pillow warning); as in the original code (Dassl's `read_image`: `convert("RGB")`), alpha is
  dropped, not composited, so the pixels match those the authors' code trained on.
* Bounds, before any transform sees the image:
  - over Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, about 89 Mpixel) an
    image is refused with a clear reason (raise the limit if the file is trusted);
  - with `image_size` S known, an image whose shorter side is at least 8 S is decoded at reduced
    size (`Image.draft` for JPEG: DCT scaling, and `Image.reduce` for other formats), keeping
    the shorter side >= 4 S, which is more than RandomResizedCrop's smallest crop (8 % of the
    area) needs for an S x S output; smaller images are decoded exactly as before;
  - an aspect ratio above `MAX_ASPECT` is centre-cropped to it (evaluation keeps only the central
    square anyway, and training crops are at most 4:3), so a 1 x 100000 strip is never resized
    to gigabytes.
"""
from __future__ import annotations

import warnings

MAX_ASPECT = 16.0
KEEP_SIDES = 4      # keep the shorter side >= KEEP_SIDES * image_size
REDUCE_FROM = 8     # reduce only when the shorter side is >= REDUCE_FROM * image_size


class ImageReadError(ValueError):
    """An image that cannot be read (the message is the reason, without the path)."""


def open_rgb(path, image_size: int | None = None):
    """The image at `path` as a fully decoded 8-bit RGB PIL image (see the module docstring);
    ImageReadError with the reason if it cannot be read."""
    import os
    import stat

    from PIL import Image

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block, /dev/zero never end
            raise ImageReadError("not a regular file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_pixels(img)
                if image_size and img.format == "JPEG":
                    _draft(img, image_size)
                img.load()
                out = to_rgb(_bound(img, image_size))
                return out.copy() if out is img else out  # closing `img` frees its pixels
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageReadError(f"{_first(err)} (Pillow's decompression-bomb limit: raise "
                             f"PIL.Image.MAX_IMAGE_PIXELS if you trust the file)") from err
    except MemoryError as err:
        raise ImageReadError("out of memory while decoding") from err
    except Exception as err:  # noqa: BLE001 - Pillow raises OSError, ValueError, SyntaxError, ...
        raise ImageReadError(_first(err)) from err


def _first(err: BaseException) -> str:
    lines = [x for x in str(err).splitlines() if x.strip()]
    return lines[0] if lines else type(err).__name__


def _check_pixels(img) -> None:
    from PIL import Image

    w, h = img.size
    if w < 1 or h < 1:
        raise ImageReadError(f"image has no pixels ({w} x {h})")
    limit = Image.MAX_IMAGE_PIXELS
    if limit and w * h > limit:
        raise ImageReadError(f"image of {w} x {h} = {w * h} pixels is over Pillow's "
                             f"decompression-bomb limit of {limit} (raise PIL.Image.MAX_IMAGE_PIXELS "
                             f"if you trust the file)")


def _draft(img, image_size: int) -> None:
    """JPEG: let the decoder scale by 1/2, 1/4 or 1/8 while the shorter side stays >= 4 S."""
    w, h = img.size
    short = min(w, h)
    if short < REDUCE_FROM * image_size:
        return
    keep = KEEP_SIDES * image_size
    img.draft(None, (-(-w * keep // short), -(-h * keep // short)))


def _bound(img, image_size: int | None):
    """Centre-crop an absurd aspect ratio, then reduce a needlessly large image."""
    w, h = img.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        if w > h:
            cw, ch = max(1, int(h * MAX_ASPECT)), h
        else:
            cw, ch = w, max(1, int(w * MAX_ASPECT))
        left, top = (w - cw) // 2, (h - ch) // 2
        img = img.crop((left, top, left + cw, top + ch))
        w, h = img.size
    if image_size:
        factor = min(w, h) // (KEEP_SIDES * image_size)
        if min(w, h) >= REDUCE_FROM * image_size and factor >= 2:
            if img.mode in ("P", "PA", "1"):
                img = img.convert("RGBA")
            elif img.mode.startswith("I;16"):  # Image.reduce has no 16-bit modes; "I" is lossless
                img = img.convert("I")
            img = img.reduce(factor)
    return img


def to_rgb(img):
    """8-bit RGB of any Pillow mode (see the module docstring)."""
    import numpy as np
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if mode == "F":
            a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
            lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
            if lo >= 0 and hi <= 1:
                a = a * 255.0
            elif lo >= 0 and hi <= 255:
                pass
            elif lo >= 0 and hi <= 65535:
                a = a / 257.0
            else:
                a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        else:
            a = np.clip(a, 0, 65535) / 257.0
        grey = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
        return grey.convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    try:
        return img.convert("RGB")
    except ValueError:
        return img.convert("RGBA").convert("RGB")  # premultiplied modes (La) and the like
