"""Image loading, the CoOp / CLIP transforms, and a torch Dataset over a list of Datum."""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Callable, Sequence

from torch.utils.data import Dataset

from ..clip import OPENAI_MEAN as CLIP_MEAN  # one copy of CLIP's preprocessing constants;
from ..clip import OPENAI_STD as CLIP_STD    # the names stay importable from here
from .protocol import DataError, Datum

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
#: what to do about an unreadable image with on_error="raise" (not said where it is skipped)
_UNREADABLE_FIX = " — replace or delete the file, or load with on_error='skip'"


def train_transform(image_size: int = 224, mean: Sequence[float] = CLIP_MEAN,
                    std: Sequence[float] = CLIP_STD, scale: Sequence[float] = (0.08, 1.0)):
    """CoOp's training augmentation: RandomResizedCrop(scale 0.08-1, bicubic) + flip + normalise
    (`scale`: the crop's area range; Tip-Adapter crops 0.5-1)."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(image_size, scale=tuple(scale),
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


def load_image(datum: Datum, image_size: int | None = None):
    """The datum's image as a fully decoded 8-bit RGB PIL image; DataError if it can't be read.
    `image_size` (the model's input side) lets huge files decode at reduced size (`decode.py`)."""
    from .decode import ImageReadError, open_rgb, to_rgb

    if datum.image is not None:
        return to_rgb(datum.image)
    if datum.impath is None:
        raise DataError(f"datum of class {datum.classname!r} has neither a path nor an image — "
                        f"build it with Datum(impath=...) or Datum(..., image=PIL image)")
    try:
        return open_rgb(datum.impath, image_size)
    except ImageReadError as err:
        raise DataError(f"cannot read image {datum.impath}: {err}{_UNREADABLE_FIX}") from None


def collate_readable(batch):
    """DataLoader collate that leaves out the unreadable items (None) of an evaluation batch;
    None when the whole batch was unreadable."""
    from torch.utils.data import default_collate

    items = [b for b in batch if b is not None]
    return default_collate(items) if items else None


class ImageDataset(Dataset):
    """A map-style torch dataset yielding ``(transform(image), label)``.

    ``on_error="raise"``: an unreadable image raises :class:`DataError` naming its path.
    ``on_error="skip"``: the image is marked unreadable, and then
      - ``replace=True`` (training): the item is replaced by the next readable image of the same
        class, so batches keep their size and the class balance stays, with a warning once (per
        process); a class none of whose images can be read is a DataError;
      - ``replace=False`` (evaluation): the item is None, which ``collate_readable`` leaves out, so
        accuracy is computed over the images actually read (the caller counts them:
        ``fastprompt.scoring.score`` warns once with the number).
    ``skipped`` lists the unreadable images found so far. ``image_size`` lets huge files decode
    at reduced size (see ``decode.py``).

    The marks live in a shared-memory tensor (one flag per item), so the marks that DataLoader
    worker processes make are seen by the main process's dataset (and by the other workers, which
    then skip that file at once): ``skipped`` is the figure over all workers, with or without
    workers, forked or spawned.
    """

    def __init__(self, data: Sequence[Datum], transform: Callable | None = None,
                 on_error: str = "skip", image_size: int | None = None, replace: bool = True):
        import torch

        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        self.data = list(data)
        self.transform = transform if transform is not None else test_transform()
        self.on_error, self.image_size, self.replace = on_error, image_size, replace
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
        """``index``, then (when replacing) the other images of its class, cyclically."""
        yield index
        if self.replace:
            same = self._by_label[self.data[index].label]
            k = same.index(index)
            yield from same[k + 1:] + same[:k]

    def __getitem__(self, index: int):
        if self.on_error == "raise":
            datum = self.data[index]
            return self.transform(load_image(datum, self.image_size)), datum.label
        for i in self._candidates(index):
            if self._bad[i]:
                continue
            datum = self.data[i]
            try:
                image = load_image(datum, self.image_size)
            except DataError as err:
                self._bad[i] = True
                if self.replace and not self._warned:
                    self._warned = True
                    warnings.warn(f"skipping unreadable images, each replaced by another image of "
                                  f"its class (first: {str(err).removesuffix(_UNREADABLE_FIX)}; "
                                  f"ImageDataset.skipped lists them)", RuntimeWarning, stacklevel=2)
                continue
            return self.transform(image), datum.label
        if not self.replace:
            return None
        datum = self.data[index]
        raise DataError(f"none of the {len(self._by_label[datum.label])} images of class "
                        f"{datum.classname!r} can be read (first: {datum.source}) — fix or replace "
                        f"them, or remove the class")
