"""The optimiser of a training run and its state in a checkpoint.

`make_optimizer(model, recipe)` builds what the recipe names over the method's trainable tensors:
SGD (Dassl: momentum, weight decay) or AdamW (CLIP-LoRA, Tip-Adapter-F: betas, eps, weight
decay). `optimizer_tensors` / `restore_optimizer` move the optimiser's per-parameter state in and
out of a flat {key: tensor} dict for `checkpoint.safetensors`:

    momentum/<param>            SGD's momentum buffer (the key older checkpoints used)
    optim/<param>/<state key>   every other state tensor (AdamW: exp_avg, exp_avg_sq, step)

A restored state must be floating point and shaped like its parameter (a scalar `step` aside):
an integer tensor would be truncated into the buffer, so it is refused with the file's name.
"""
from __future__ import annotations

import torch

from .errors import CheckpointError, TrainingError, setting

MOMENTUM = "momentum_buffer"


def make_optimizer(model, recipe) -> torch.optim.Optimizer:
    params = list(model.trainable_state().values())
    if not params:
        raise TrainingError(f"method '{model.name}' has nothing to train: use {setting('--epochs', 0)}")
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, betas=tuple(recipe.betas), eps=recipe.eps,
                                 weight_decay=recipe.weight_decay)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                           weight_decay=recipe.weight_decay)


def state_key(name: str, key: str) -> str:
    return f"momentum/{name}" if key == MOMENTUM else f"optim/{name}/{key}"


def optimizer_tensors(model, optimizer) -> dict[str, torch.Tensor]:
    """{checkpoint key: tensor} of the optimiser's state of every trainable tensor (CPU copies)."""
    out = {}
    for name, p in model.trainable_state().items():
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                out[state_key(name, key)] = value.detach().cpu().contiguous()
    return out


def restore_optimizer(model, optimizer, tensors: dict, path) -> None:
    """Put the state saved by `optimizer_tensors` back (a parameter without saved state starts
    fresh, as it would in a new run); a tensor of the wrong dtype or shape is a CheckpointError."""
    for name, p in model.trainable_state().items():
        prefix = f"optim/{name}/"
        state = {key[len(prefix):]: t for key, t in tensors.items() if key.startswith(prefix)}
        if f"momentum/{name}" in tensors:
            state[MOMENTUM] = tensors[f"momentum/{name}"]
        for key, t in state.items():
            where = f"'{state_key(name, key)}' in {path}"
            if not t.is_floating_point():
                raise CheckpointError(f"{where} has dtype {t.dtype}, expected floating point: the "
                                      f"file was altered; restore it or start a new run")
            if t.dim() and t.shape != p.shape:
                raise CheckpointError(f"{where} has shape {tuple(t.shape)}, the model's is "
                                      f"{tuple(p.shape)}: another method/config")
            optimizer.state[p][key] = t.to(p.device) if t.dim() else t.clone()
