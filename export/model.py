"""The exported model: a run's classifier made traceable, and the metadata that travels with it.

`exportable_classifier` turns a loaded run into the module the exporters trace (reference kernels,
fp32, CPU); `metadata` writes what a runner needs besides the graph (class names, image size,
mean/std, output kind, where it came from) and `read_metadata` reads it back, checked. The ONNX
exporter (`onnx.py`), the TensorRT sidecar (`engine.py`) and the runners (`runners.py`) share
this one contract.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from fastprompt.errors import ExportError
from fastprompt.readers import ascii_int, loads

#: mean and std of the metadata lie within +-PIXEL_BOUND, std above 1/PIXEL_BOUND: pixels are
#: 0..1, and a std of 1e-300 is 0 in float32 (a division by zero), 1e-40 an overflow to inf
PIXEL_BOUND = 1e6


def run_fingerprint(run_dir) -> str:
    """sha256 over the run's adapter.safetensors then config.json bytes."""
    from fastprompt.checkpoint import CONFIG, WEIGHTS

    h = hashlib.sha256()
    for name in (WEIGHTS, CONFIG):
        h.update((Path(run_dir) / name).read_bytes())
    return h.hexdigest()


def load_run(run_dir):
    """fp.load(run_dir), with every failure turned into a one-line ExportError."""
    import fastprompt as fp
    from fastprompt.errors import BackboneError, FastpromptError, first_line

    path = Path(run_dir)
    if not path.is_dir():
        raise ExportError(f"run directory not found: {run_dir}")
    try:
        return fp.load(path)
    except ExportError:
        raise
    except (FastpromptError, BackboneError) as err:  # checkpoint, backbone, options in config.json
        raise ExportError(first_line(err)) from None


def exportable_classifier(model) -> nn.Module:
    """The model's cached-text classifier on the reference (pure-torch) path, fp32, CPU."""
    if not getattr(model, "caches_text", True):
        raise ExportError(
            f"method '{model.name}' cannot be exported: its text features depend on each image "
            f"(the text tower runs per image), so there is no single image pass to export; serve it "
            f"with torch instead (python -m fastprompt.predict --model RUN_DIR)")
    clf = model.classifier()
    if not getattr(clf, "caches_text", True):
        raise ExportError(f"method '{model.name}' has no cached-text classifier to export")
    clf.use_reference_kernels().eval()
    if clf.logit_scale.device.type != "cpu" or clf.logit_scale.dtype != torch.float32:
        # traced and checked on the CPU in fp32; a copy, so the caller's model stays where it is
        clf = copy.deepcopy(clf).float().cpu()
    return clf


class _ImagesOnly(nn.Module):
    """One graph input (images); logits or normalised features out."""

    def __init__(self, clf: nn.Module, features: bool):
        super().__init__()
        self.clf, self.features = clf, features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clf.features(images) if self.features else self.clf(images)


def metadata(model, clf, features: bool, fingerprint: str | None) -> dict[str, str]:
    """What a runner needs besides the graph, as ONNX metadata_props (strings; lists as JSON)."""
    import fastprompt

    return {
        "classnames": json.dumps(list(clf.classnames)),
        "image_size": str(int(clf.image_size)),
        "mean": json.dumps([float(v) for v in clf.mean]),
        "std": json.dumps([float(v) for v in clf.std]),
        "method": model.name,
        "backbone": json.dumps(model.clip.source),
        "output": "features" if features else "logits",
        "fastprompt_version": fastprompt.__version__,
        "run_fingerprint": fingerprint or "",
    }


def read_metadata(props: dict[str, str], where="the model") -> dict:
    """Parse and check the metadata_props written by `metadata`: ExportError (one line naming the
    key) if one is missing or malformed."""
    missing = [k for k in ("classnames", "image_size", "mean", "std", "output") if k not in props]
    if missing:
        raise ExportError(f"{where} is not a fastprompt export: its metadata lacks "
                          f"{', '.join(missing)}; export it again with python -m fastprompt.export")
    out = dict(props)

    def bad(key, want):
        return ExportError(f"metadata '{key}' of {where} is {str(props.get(key))[:60]!r}, expected "
                           f"{want}: export the run again")

    for key in ("classnames", "mean", "std", "backbone"):
        if key in out:
            try:
                out[key] = loads(out[key])
            except (ValueError, TypeError):
                raise bad(key, "JSON") from None
    names = out["classnames"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise bad("classnames", "a JSON list of class names")
    for key, low in (("mean", -PIXEL_BOUND), ("std", 1 / PIXEL_BOUND)):
        v = out[key]
        if not (isinstance(v, list) and len(v) == 3 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and low <= x <= PIXEL_BOUND
                for x in v)):
            raise bad(key, f"a JSON list of 3 numbers from {low:g} to {PIXEL_BOUND:g}")
    size = ascii_int(str(out["image_size"]).strip())
    if size is None or not 1 <= size <= 16384:
        raise bad("image_size", "an integer from 1 to 16384")
    out["image_size"] = size
    if out["output"] not in ("logits", "features"):
        raise bad("output", "'logits' or 'features'")
    return out
