"""A run's per-epoch checkpoint: what `--resume` continues from.

`checkpoint.safetensors` (one atomic file, rewritten after every epoch) holds

    param/<name>             every trainable tensor
    momentum/<name>, optim/<name>/<key>   the optimiser's state (`fastprompt.optim`)
    train_state/<key>        the method's own training state (`Method.training_state`: GPA's sums)

with the finished epoch and the optimiser steps taken in its metadata. On resume every tensor must
be floating point and shaped as the model's (an integer tensor would be truncated into a float
one), finite, and the counts plain ASCII digits; anything else is one line naming the file.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .checkpoint import CheckpointError, check_finite, read_safetensors, save, write_safetensors
from .errors import TrainingError
from .files import write_text
from .optim import optimizer_tensors, restore_optimizer

CHECKPOINT = "checkpoint.safetensors"
LOG = "log.jsonl"
TRAIN_STATE = "train_state/"


def save_checkpoint(model, optimizer, run_dir: Path, epoch: int, extra: dict, step: int | None = None) -> None:
    """The epoch's checkpoint (trainable tensors, optimiser state, the method's training state,
    finished epoch and optimiser steps) and adapter files, each written atomically; tensors
    holding NaN/inf stop training instead (the previous epoch's files stay as they are)."""
    tensors = {f"param/{name}": p.detach().cpu().contiguous()
               for name, p in model.trainable_state().items()}
    tensors.update(optimizer_tensors(model, optimizer))
    tensors.update({f"{TRAIN_STATE}{k}": t.detach().cpu().contiguous()
                    for k, t in model.training_state().items()})
    try:
        check_finite(tensors, f"the model after epoch {epoch}")
    except CheckpointError as err:
        raise TrainingError(f"{err}; epoch {epoch} was not saved, the files of epoch {epoch - 1} in "
                            f"{run_dir} are intact") from None
    meta = {"epoch": str(epoch), **({"step": str(step)} if step is not None else {})}
    write_safetensors(run_dir / CHECKPOINT, tensors, meta)
    save(model, run_dir, extra=extra)


def _count(meta: dict, key: str, path: Path, required: bool = True) -> int | None:
    """A non-negative count recorded in the checkpoint's metadata (ASCII digits only)."""
    from .errors import short_repr as short

    value = meta.get(key)
    if value is None and not required:
        return None
    if not (isinstance(value, str) and re.fullmatch(r"[0-9]{1,12}", value)):
        raise CheckpointError(f"{path} records no valid '{key}' (metadata {short(meta)}): restore "
                              f"it or start a new run")
    return int(value)


def load_checkpoint(model, optimizer, run_dir: Path) -> tuple[int, int | None]:
    """Restore trainable tensors, optimiser and method training state; return (finished epochs,
    optimiser steps taken, None when the file predates step counts)."""
    from safetensors import safe_open

    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise TrainingError(f"nothing to resume: no {CHECKPOINT} in {run_dir} (drop --resume)")
    tensors = read_safetensors(path, "the run")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    epoch, step = _count(meta, "epoch", path), _count(meta, "step", path, required=False)
    own = model.trainable_state()
    missing = [k for k in own if f"param/{k}" not in tensors]
    if missing:
        raise TrainingError(f"{path} lacks '{missing[0]}': it belongs to another method/config")
    for name, p in own.items():
        t = tensors[f"param/{name}"]
        if not t.is_floating_point():
            raise CheckpointError(f"'param/{name}' in {path} has dtype {t.dtype}, expected floating "
                                  f"point (its values would be truncated): restore the file or "
                                  f"start a new run")
        if t.shape != p.shape:
            raise CheckpointError(f"'param/{name}' in {path} has shape {tuple(t.shape)}, the model's "
                                  f"is {tuple(p.shape)}: another method/config")
    check_finite(tensors, path)
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(tensors[f"param/{name}"])
    restore_optimizer(model, optimizer, tensors, path)
    state = {k[len(TRAIN_STATE):]: t for k, t in tensors.items() if k.startswith(TRAIN_STATE)}
    model.load_training_state(state, path)
    return epoch, step


def drop_log_after(run_dir: Path, epoch: int) -> None:
    """Resuming after epoch `epoch`: the log keeps the lines of the epochs the checkpoint holds
    (a line written before a checkpoint write that then failed is dropped; it will be rerun)."""
    path = run_dir / LOG
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    keep = []
    for line in lines:
        try:
            if int(json.loads(line).get("epoch", 0)) <= epoch:
                keep.append(line)
        except (ValueError, TypeError, AttributeError):
            continue  # a line no reader could use
    if keep != lines:
        write_text(path, "".join(k + "\n" for k in keep))


