"""Image loading, the CoOp / CLIP transforms, and a torch Dataset over a list of Datum."""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Callable, Sequence

from torch.utils.data import Dataset

from .protocol import DataError, Datum

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def train_transform(image_size: int = 224, mean: Sequence[float] = CLIP_MEAN,
                    std: Sequence[float] = CLIP_STD):
    """CoOp's training augmentation: RandomResizedCrop(scale 0.08-1, bicubic) + flip + normalise."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.08, 1.0),
                            interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def test_transform(image_size: int = 224, mean: Sequence[float] = CLIP_MEAN,
                   std: Sequence[float] = CLIP_STD):
    """CLIP's evaluation preprocessing: shorter side to ``image_size`` (bicubic) + centre crop."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


test_transform.__test__ = False  # not a pytest test, even when imported into a test module


def load_image(datum: Datum):
    """The datum's image as an RGB PIL image, fully decoded; DataError if it can't be read."""
    from PIL import Image

    if datum.image is not None:
        return datum.image if datum.image.mode == "RGB" else datum.image.convert("RGB")
    if datum.impath is None:
        raise DataError(f"datum of class {datum.classname!r} has neither a path nor an image — "
                        f"build it with Datum(impath=...) or Datum(..., image=PIL image)")
    try:
        with Image.open(datum.impath) as img:
            return img.convert("RGB")  # convert() forces the full decode, so truncation shows here
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBomb...
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"cannot read image {datum.impath}: {reason} — replace or delete the "
                        f"file, or load with on_error='skip'") from err


class ImageDataset(Dataset):
    """A map-style torch dataset yielding ``(transform(image), label)``.

    ``on_error="raise"``: an unreadable image raises :class:`DataError` naming its path.
    ``on_error="skip"``: the image is marked unreadable, a warning is issued once (per process),
    and the item is replaced by the next readable image of the same class (any class if none is
    left), so batches keep their size and labels stay correct. ``skipped`` lists the unreadable
    images found so far.

    The marks live in a shared-memory tensor (one flag per item), so the marks that DataLoader
    worker processes make are seen by the main process's dataset (and by the other workers, which
    then skip that file at once): ``skipped`` is the figure over all workers, with or without
    workers, forked or spawned.
    """

    def __init__(self, data: Sequence[Datum], transform: Callable | None = None,
                 on_error: str = "skip"):
        import torch

        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        self.data = list(data)
        self.transform = transform if transform is not None else test_transform()
        self.on_error = on_error
        self._bad = torch.zeros(len(self.data), dtype=torch.bool).share_memory_()
        self._warned = False
        self._by_label: dict[int, list[int]] = defaultdict(list)
        for i, d in enumerate(self.data):
            self._by_label[d.label].append(i)

    @property
    def skipped(self) -> list[str]:
        """Sources (paths) of the images found unreadable so far, in dataset order, over all
        DataLoader workers."""
        return [self.data[i].source for i in self._bad.nonzero().flatten().tolist()]

    def __len__(self) -> int:
        return len(self.data)

    def _candidates(self, index: int):
        """``index``, then its stand-ins: same class first (cyclic), then every item."""
        yield index
        same = self._by_label[self.data[index].label]
        k = same.index(index)
        yield from same[k:] + same[:k]
        n = len(self.data)
        yield from ((index + j) % n for j in range(n))

    def __getitem__(self, index: int):
        if self.on_error == "raise":
            datum = self.data[index]
            return self.transform(load_image(datum)), datum.label
        for i in self._candidates(index):
            if self._bad[i]:
                continue
            datum = self.data[i]
            try:
                image = load_image(datum)
            except DataError as err:
                self._bad[i] = True
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"skipping unreadable images (first: {err}); "
                                  f"see ImageDataset.skipped for all of them", RuntimeWarning,
                                  stacklevel=2)
                continue
            return self.transform(image), datum.label
        skipped = self.skipped
        raise DataError(f"none of the {len(self.data)} images could be read (first: "
                        f"{skipped[0] if skipped else '?'}) — check the data root")
