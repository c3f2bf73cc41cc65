"""Adapter-only checkpoints: `config.json` (how to rebuild) + `adapter.safetensors` (trainable tensors).

Nothing of the backbone is stored, only where its weights come from (model name, pretrained
source, init seed); nothing is unpickled on load.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .api import create
from .clip import Clip, load_clip

FORMAT = "fastprompt-adapter/1"
CONFIG, WEIGHTS = "config.json", "adapter.safetensors"


class CheckpointError(ValueError):
    """A run directory that cannot be loaded (one-line reason)."""


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename: a crash never leaves a half-written file under `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save(model, run_dir: str | os.PathLike, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous()
               for k, v in model.trainable_state().items()}
    config = {
        "format": FORMAT,
        "method": model.name,
        "options": model.options(),
        "backbone": model.clip.source,
        "classnames": model.classnames,
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        **(extra or {}),
    }
    atomic_write(run / WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
    atomic_write(run / CONFIG, lambda p: p.write_text(json.dumps(config, indent=2)))
    return run


def check_fingerprint(src: dict, clip: Clip, run_dir) -> None:
    """The backbone weights must be those the run was trained on (runs saved before fingerprints
    were recorded are not checked)."""
    want = src.get("fingerprint")
    if want and clip.fingerprint != want:
        raise CheckpointError(f"the backbone weights ({clip.name}, {clip.pretrained}) differ from those "
                              f"{run_dir} was trained on (fingerprint {clip.fingerprint}, recorded "
                              f"{want}): the checkpoint file was replaced or open_clip changed its "
                              f"init; restore the original weights")


def read_config(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG} in {run_dir}: not a fastprompt run directory")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {config.get('format')!r}, expected {FORMAT!r}")
    return config


def load(run_dir: str | os.PathLike, clip: Clip | None = None, method: str | None = None,
         device: str | torch.device | None = None):
    """Rebuild the model of a run directory; reuse `clip` when given (it must be the same backbone).
    `device` builds a missing backbone there (a given `clip` stays where it is)."""
    from safetensors.torch import load_file

    config = read_config(run_dir)
    if method is not None and method != config["method"]:
        raise CheckpointError(f"{run_dir} holds a '{config['method']}' model, not '{method}'")
    src = config["backbone"]
    if clip is None:
        clip = load_clip(src["model"], src["pretrained"], seed=src["seed"], device=device or "cpu",
                         quick_gelu=src.get("quick_gelu"))
    elif clip.name != src["model"] or clip.pretrained != src["pretrained"] or (
            src["pretrained"] is None and clip.seed != src["seed"]) or (
            src.get("quick_gelu") is not None and clip.quick_gelu != src["quick_gelu"]):
        raise CheckpointError(f"{run_dir} was trained on backbone {src}, not {clip.source}: "
                              f"pass clip=None or the matching backbone")
    check_fingerprint(src, clip, run_dir)
    model = create(config["method"], clip, config["classnames"], **config["options"])
    weights = Path(run_dir) / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"missing {weights}: the run was not saved completely")
    tensors = load_file(str(weights))
    own = model.trainable_state()
    for key in sorted(set(own) | set(tensors)):
        if key not in tensors:
            raise CheckpointError(f"{weights} lacks tensor '{key}' that {config['method']} needs")
        if key not in own:
            raise CheckpointError(f"{weights} has tensor '{key}' unknown to {config['method']}")
        if tuple(own[key].shape) != tuple(tensors[key].shape):
            raise CheckpointError(f"tensor '{key}' has shape {tuple(tensors[key].shape)} in "
                                  f"{weights}, the model expects {tuple(own[key].shape)}: "
                                  f"checkpoint from another backbone?")
    with torch.no_grad():
        for key, p in own.items():
            p.copy_(tensors[key].to(p.dtype))
    return model
