"""Images: every mode into the 8-bit RGB of an 8-bit file, bounded work, honest counting."""
import os
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from fastprompt.data import DataError, Datum, ImageDataset, test_transform
from fastprompt.data.decode import ImageReadError, open_rgb

GREY8 = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) % 256  # the 8-bit picture


def _png16(path, arr, colour_type):
    """A 16-bit PNG written by hand (Pillow cannot write every 16-bit layout)."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    head = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("kind", ["I;16", "I;16B", "png-grey16", "png-rgb16", "png-la16", "I", "F",
                                  "F-255"])
def test_deep_images_read_as_their_8_bit_picture(kind, tmp_path):
    v16 = GREY8 * 257  # 8-bit values stored in 16 bits
    if kind in ("I;16", "I;16B"):
        dtype = "<u2" if kind == "I;16" else ">u2"
        Image.frombytes(kind, (32, 32), v16.astype(dtype).tobytes()).save(tmp_path / "x.png")
    elif kind == "png-grey16":
        _png16(tmp_path / "x.png", v16, 0)
    elif kind == "png-rgb16":
        _png16(tmp_path / "x.png", np.stack([v16] * 3, -1), 2)
    elif kind == "png-la16":
        _png16(tmp_path / "x.png", np.stack([v16, np.full_like(v16, 65535)], -1), 4)
    elif kind == "I":
        Image.frombytes("I", (32, 32), v16.astype("<i4").tobytes()).save(tmp_path / "x.tiff")
    else:
        scale = 255.0 if kind == "F" else 1.0
        Image.frombytes("F", (32, 32), (GREY8 / scale).astype("<f4").tobytes()).save(tmp_path / "x.tiff")
    path = next(tmp_path.iterdir())
    rgb = np.asarray(open_rgb(path))
    assert rgb.dtype == np.uint8 and rgb.shape == (32, 32, 3)
    assert np.array_equal(rgb[..., 0], GREY8) and np.array_equal(rgb[..., 2], GREY8)


def test_palette_transparency_cmyk_and_in_memory_modes(tmp_path):
    p = Image.new("P", (16, 16), 3)
    p.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * 756)
    p.info["transparency"] = bytes([0, 255, 255, 255])
    p.save(tmp_path / "p.png", transparency=bytes([0, 255, 255, 255]))
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow "palette with transparency" warning
        assert open_rgb(tmp_path / "p.png").getpixel((0, 0)) == (10, 20, 30)
        r, g, b = open_rgb(tmp_path / "c.jpg").getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60
    d = Datum(None, 0, "x", image=Image.frombytes("I;16", (4, 4), (np.full(16, 257 * 7, "<u2")).tobytes()))
    item, _ = ImageDataset([d], transform=lambda im: torch.from_numpy(np.array(im)))[0]
    assert int(item.max()) == 7  # in-memory images go through the same conversion


def test_work_per_image_is_bounded(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (3000, 2000, 3), dtype=np.uint8)).save(tmp_path / "big.jpg")
    Image.new("L", (100_000, 1)).save(tmp_path / "strip.png")
    t0 = time.perf_counter()
    small = open_rgb(tmp_path / "big.jpg", image_size=32)  # decoded at 1/8 scale (draft)
    assert min(small.size) >= 4 * 32 and small.size[0] < 2000
    assert open_rgb(tmp_path / "big.jpg", image_size=300).size == (2000, 3000)  # < 8 S: exact
    strip = open_rgb(tmp_path / "strip.png", image_size=224)
    assert max(strip.size) <= 16 * min(strip.size)
    x = test_transform(224)(strip)  # was a 224 x 22,400,000 resize before the crop
    assert x.shape == (3, 224, 224) and time.perf_counter() - t0 < 20
    os.mkfifo(tmp_path / "fifo.png")  # opening it would wait for a writer forever
    for special in (tmp_path / "fifo.png", "/dev/zero"):
        with pytest.raises(ImageReadError, match="not a regular file"):
            open_rgb(special)
    for limit in (1000, 4_000_000):  # over twice the limit (Pillow raises) and between (it warns)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(ImageReadError, match="decompression-bomb limit.*MAX_IMAGE_PIXELS"):
            open_rgb(tmp_path / "big.jpg")


def _files(tmp_path, classes=2, per_class=3):
    data = []
    for y in range(classes):
        for i in range(per_class):
            path = tmp_path / f"{y}_{i}.png"
            Image.new("RGB", (8, 8), (100 * y, 10 * i, 0)).save(path)
            data.append(Datum(str(path), y, f"class{y}"))
    return data


def test_a_wholly_unreadable_class_is_an_error(tmp_path):
    data = _files(tmp_path)
    for d in data[3:]:
        open(d.impath, "wb").write(b"broken")
    ds = ImageDataset(data, transform=lambda im: 0)
    with pytest.warns(RuntimeWarning):
        assert ds[0][1] == 0
        with pytest.raises(DataError, match="none of the 3 images of class 'class1' can be read"):
            ds[3]


def test_evaluation_leaves_unreadable_images_out(tmp_path):
    from fastprompt.scoring import score

    data = _files(tmp_path)
    open(data[4].impath, "wb").write(b"broken")

    class Oracle(torch.nn.Module):  # right on class 0, wrong on class 1: acc = 3 / 5 read
        image_size, mean, std = 8, (0.5,) * 3, (0.5,) * 3

        def forward(self, x):
            return torch.tensor([[1.0, 0.0]]).repeat(x.shape[0], 1)

    with pytest.warns(RuntimeWarning, match="1 of 6 evaluation images were unreadable and are left "
                                            "out: accuracy over the 5 read"):
        result = score(Oracle(), data, torch.device("cpu"), batch_size=4)
    assert result.read == 5 and result.acc == pytest.approx(60.0)  # a duplicate would give 3/6
    assert result.unreadable == [data[4].impath]
    for d in data:
        open(d.impath, "wb").write(b"broken")
    with pytest.raises(DataError, match="none of the 6 evaluation images could be read"):
        score(Oracle(), data, torch.device("cpu"))
