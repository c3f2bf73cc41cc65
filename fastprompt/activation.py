"""Which MLP activation a backbone's weights need, and a fingerprint of those weights.

OpenAI trained CLIP with QuickGELU, `x * sigmoid(1.702 x)`; open_clip 3.x builds `ViT-B-16` with
nn.GELU and only *warns* when OpenAI weights go into it (every logit moves). The rule here
(`resolve_quick_gelu`), first match wins:

1. an explicit `quick_gelu=True/False` (refused where it contradicts the model name);
2. a model name that fixes it (`ViT-B-16-quickgelu`) or an `hf-hub:` / `local-dir:` config;
3. an open_clip tag: its pretrained config's `quick_gelu` (True for every `openai` tag);
4. a local file in OpenAI's release format — the TorchScript archive that OpenAI's `clip` package
   downloads (and the original CoOp / MaPLe / MMA / LAMM code loads), or a state dict still holding
   that archive's `input_resolution` / `context_length` / `vocab_size` entries — is QuickGELU, as
   open_clip's own OpenAI loader builds it;
5. any other file or random init: the model config's own choice. A plain state dict does not say
   how it was trained; for a model that has OpenAI weights this is flagged with a warning.
"""
from __future__ import annotations

import hashlib
import os
import warnings
import zipfile

import torch

from .errors import BackboneError, first_line

OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


class ActivationWarning(UserWarning):
    """The activation of a checkpoint file could not be told from the file."""


def uses_quick_gelu(model) -> bool:
    """True when the built network's MLPs use QuickGELU."""
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in model.modules())


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def openai_release_state(path: str) -> dict | None:
    """The fp32 state dict of a file in OpenAI's release format (its three extra entries dropped):
    the TorchScript archive, or a state dict that kept those entries. None for any other file.

    Reading an archive builds TorchScript's own restricted objects (no Python pickle code runs);
    a state dict is read with `weights_only=True`."""
    try:
        if _is_torchscript(path):
            with warnings.catch_warnings():  # torch.jit is deprecated, yet it is the release format
                warnings.simplefilter("ignore", FutureWarning)
                state = torch.jit.load(path, map_location="cpu").state_dict()
        elif set(OPENAI_EXTRA_KEYS) & _state_keys(path):
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
        else:
            return None
    except (RuntimeError, ValueError, OSError) as e:
        raise BackboneError(f"cannot read the checkpoint {path}: {first_line(e)}") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()
            if k not in OPENAI_EXTRA_KEYS}


def _state_keys(path: str) -> set[str]:
    """Key names of a checkpoint file, read without loading its tensors where possible."""
    if path.endswith(".safetensors"):
        return set()  # safetensors files come from open_clip / timm, not from OpenAI's release
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - open_clip reports unreadable files when it loads them
        return set()
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return set(obj) if isinstance(obj, dict) else set()


def resolve_quick_gelu(open_clip, name: str, pretrained: str | None,
                       quick_gelu: bool | None) -> tuple[bool, dict | None]:
    """(build with QuickGELU?, the state dict of an OpenAI release-format file, else None)."""
    file = pretrained if pretrained is not None and os.path.isfile(pretrained) else None
    release_state = openai_release_state(file) if file else None
    schema = name.split(":", 1)[0] if ":" in name else None
    own = None if schema else (open_clip.get_model_config(name) or {}).get("quick_gelu", False)
    if quick_gelu is not None:
        if own and not quick_gelu:
            raise BackboneError(f"model {name} is the QuickGELU variant: drop quick_gelu=False or "
                                f"use {name.removesuffix('-quickgelu')}")
        return bool(quick_gelu), release_state
    if schema or own:
        return bool(own), release_state
    if pretrained is not None and file is None:
        tag = open_clip.get_pretrained_cfg(name, pretrained) or {}
        return bool(tag.get("quick_gelu", False)), None
    if release_state is not None:
        return True, release_state
    if file is not None:
        if "openai" in open_clip.list_pretrained_tags_by_model(name):
            warnings.warn(f"{file} does not say which activation it was trained with: building "
                          f"{name} with GELU (open_clip's config). For OpenAI's CLIP weights pass "
                          f"quick_gelu=True (--quick-gelu) or use the model {name}-quickgelu",
                          ActivationWarning, stacklevel=3)
    return False, None


def weights_fingerprint(model: torch.nn.Module, samples: int = 4096) -> str:
    """A short hash of every tensor's name, shape and `samples` evenly strided values.

    Cheap (milliseconds for ViT-B/16) yet different for any two distinct checkpoints in practice:
    it lets a run directory notice that its backbone file was replaced or the random init changed."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(flat[::step][:samples].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]
