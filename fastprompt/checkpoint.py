"""Adapter-only checkpoints: `config.json` (how to rebuild) + `adapter.safetensors` (trainable tensors).

Nothing of the backbone is stored, only where its weights come from (model name, pretrained
source, init seed); nothing is unpickled on load. The options are what defines the model
(`Method.options()`), never how fast it ran: a model loads with every runtime switch on
(`model.runtime`); the switches older runs saved among their options are ignored.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .api import create
from .backbone import RUNTIME_OPTIONS
from .clip import Clip, load_clip
from .config import MAX_SEED
from .errors import CheckpointError, FastpromptError, first_line, short_repr
from .files import atomic_write, write_json
from .readers import loads

FORMAT = "fastprompt-adapter/1"
CONFIG, WEIGHTS = "config.json", "adapter.safetensors"

__all__ = ["CONFIG", "FORMAT", "WEIGHTS", "CheckpointError", "atomic_write", "check_config",
           "check_finite", "load", "read_config", "read_safetensors", "save"]


def check_finite(tensors: dict, what) -> None:
    """CheckpointError naming the first tensor of `tensors` with a NaN or inf value."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"tensor '{key}' of {what} holds NaN/inf values: the run diverged; "
                                  f"train again with a lower --lr (or --precision fp32)")


def read_safetensors(path: Path, what: str = "the run") -> dict:
    """All tensors of a safetensors file; a truncated or corrupt file is a one-line CheckpointError."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors' Rust errors have no common base here
        raise CheckpointError(f"cannot read {path}: {first_line(err)}: the file is truncated or "
                              f"corrupt; restore it or train {what} again") from None


def write_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    """`tensors` to a safetensors file, atomically (`files.atomic_write`). The writer's own error
    (safetensors raises its SafetensorError for a full disk) becomes the OSError it reports, naming
    `path`, so the CLI says which file could not be written and why, in one line."""
    import re

    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except OSError:
            raise
        except Exception as err:  # noqa: BLE001 - SafetensorError has no importable base here
            code = re.search(r"os error (\d+)", str(err))
            if code:
                number = int(code.group(1))
                raise OSError(number, os.strerror(number), str(path)) from None
            raise CheckpointError(f"cannot write {path}: {first_line(err)}") from None
    return atomic_write(path, write)


def save(model, run_dir: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write `config.json` + `adapter.safetensors` (each atomically); non-finite tensors are
    refused, so a diverged model never replaces a good one."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous()
               for k, v in model.trainable_state().items()}
    check_finite(tensors, f"the {model.name} model (not saved to {run})")
    config = {
        "format": FORMAT,
        "method": model.name,
        "options": model.options(),
        "backbone": model.clip.source,
        "classnames": model.classnames,
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        **(extra or {}),
    }
    write_safetensors(run / WEIGHTS, tensors, {"format": FORMAT})
    write_json(run / CONFIG, config)
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


#: config.json keys -> (accepted types, what to say); "?" marks an optional key
_SCHEMA = {
    "format": (str, "a string"), "method": (str, "a method name"), "options": (dict, "an object"),
    "backbone": (dict, "an object"), "classnames": (list, "a list of class names"),
    "tensors?": (dict, "an object"), "run?": (dict, "an object"), "original?": (dict, "an object"),
}
_BACKBONE = {"model": (str,), "pretrained": (str, type(None)), "seed": (int,)}


def check_config(config, path) -> dict:
    """`config` if it has every key with the right type, else a CheckpointError naming the key."""
    fix = "restore the file or save the run again"
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a {type(config).__name__}, not a run's JSON object: {fix}")
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {config.get('format')!r:.60}, expected {FORMAT!r}")
    for spec, (kind, say) in _SCHEMA.items():
        key = spec.rstrip("?")
        if key not in config:
            if spec.endswith("?"):
                continue
            raise CheckpointError(f"{path} lacks the key '{key}': {fix}")
        if not isinstance(config[key], kind):
            raise CheckpointError(f"'{key}' in {path} is a {type(config[key]).__name__}, expected "
                                  f"{say}: {fix}")
    names = config["classnames"]
    if not names or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"'classnames' in {path} must be a non-empty list of strings: {fix}")
    for key, kinds in _BACKBONE.items():
        value = config["backbone"].get(key, ...)
        if value is ... or not isinstance(value, kinds) or isinstance(value, bool):
            raise CheckpointError(f"'backbone.{key}' in {path} is missing or of the wrong type "
                                  f"({type(value).__name__}): {fix}")
    seed = config["backbone"]["seed"]
    if not 0 <= seed <= MAX_SEED:
        raise CheckpointError(f"'backbone.seed' in {path} is {short_repr(seed)}, outside 0..{MAX_SEED} "
                              f"(the seeds a run accepts): {fix}")
    return config


def read_config(run_dir: str | os.PathLike) -> dict:
    """The checked config.json of a run directory (CheckpointError, one line, if unusable)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG} in {run_dir}: not a fastprompt run directory")
    try:
        config = loads(path.read_bytes())
    except ValueError as err:  # JSONDecodeError, bad UTF-8, NaN constants, too deep
        raise CheckpointError(f"{path} is not valid JSON ({first_line(err)}): restore the file or "
                              f"save the run again") from None
    return check_config(config, path)


def load(run_dir: str | os.PathLike, clip: Clip | None = None, method: str | None = None,
         device: str | torch.device | None = None):
    """Rebuild the model of a run directory; reuse `clip` when given (it must be the same backbone).
    `device` builds a missing backbone there (a given `clip` stays where it is)."""
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
    try:
        options = {k: v for k, v in config["options"].items() if k not in RUNTIME_OPTIONS}
        model = create(config["method"], clip, config["classnames"], **options)
    except (FastpromptError, ValueError) as err:  # unknown method, option of the wrong type, ...
        raise CheckpointError(f"{Path(run_dir) / CONFIG}: {first_line(err)}") from None
    weights = Path(run_dir) / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"missing {weights}: the run was not saved completely")
    tensors = read_safetensors(weights)
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
        if not tensors[key].is_floating_point():
            raise CheckpointError(f"tensor '{key}' in {weights} has dtype {tensors[key].dtype}, "
                                  f"expected floating point: restore the file")
    check_finite(tensors, weights)
    with torch.no_grad():
        for key, p in own.items():
            p.copy_(tensors[key].to(p.dtype))
    return model
