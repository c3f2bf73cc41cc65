"""Datasets, the few-shot / base-to-novel protocol, and image pipelines.

```python
d = load_dataset("oxford_pets", "/data")      # or "folder" (class-per-sub-folder), "builtin"
d = few_shot(d, shots=16, seed=1)             # K per class train, min(K, 4) val
base, novel = split_base_novel(d)             # CoOp's subsample_classes
ds = ImageDataset(base.train, train_transform(224))
```
"""

from .datasets import (SPECS, canonical_name, list_datasets, load_dataset, register_dataset,
                       zero_shot_template)
from .images import (CLIP_MEAN, CLIP_STD, IMAGE_EXTENSIONS, ImageDataset, load_image,
                     test_transform, train_transform)
from .protocol import DataError, DatasetSplits, Datum, few_shot, split_base_novel

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "IMAGE_EXTENSIONS", "SPECS", "DataError", "DatasetSplits", "Datum",
    "canonical_name", "zero_shot_template",
    "ImageDataset", "few_shot", "list_datasets", "load_dataset", "load_image", "register_dataset",
    "split_base_novel", "test_transform", "train_transform",
]
