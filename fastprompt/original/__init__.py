"""Checkpoints of the authors' code (CoOp, CoCoOp, MaPLe, IVLP, MMA, LAMM, PromptSRC, KgCoOp,
CLIP-LoRA, Tip-Adapter, CLIP-Adapter) in and out of fastprompt.

    model = load_original("maple", "output/base2new/.../seed1", clip, classnames)
    sd = original_state_dict(model)   # {"prompt_learner.ctx": model.ctx, ...} (live tensors)
    save_original(model, out_dir)     # <out_dir>/<registered name>/model.pth.tar-<epoch>

CLIP-LoRA writes a file of its own (`lora_weights.pt`: weights per adapted block and the metadata
r, alpha, encoder, params, position), which its `Layout.file_format` reads and writes; what the
file records is cross-checked against `config` like the tensors are.

The file is read with a restricted unpickler (`unpickle.safe_load`): nothing in it is executed.
What the tensors tell (n_ctx, depth, adapter layers and width, class count, label length) is read
from them; `config` (original names, e.g. {"ADAPTER_SCALE": 0.1}, or the original YAML) supplies
the rest and is cross-checked. Any mismatch is an `OriginalCheckpointError` naming the key.
Config names fastprompt does not know are ignored with a warning listing them (original configs
carry many that do not concern the tensors); values it cannot honour are refused.
What is generic lives here and in `keys.py`; each method's key correspondences, config names,
detection and option reader are its `original_layout`, in its own file (fastprompt/methods/).
"""
from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import short_repr
from ..files import atomic_write
from .keys import (OriginalCheckpointError, detect, file_key, full_key, ignorable, options_for,
                   original_names, read_config, with_recorded)

__all__ = ["OriginalCheckpointError", "load_original", "original_state_dict", "save_original",
           "find_checkpoint"]


class OriginalCheckpointWarning(UserWarning):
    """Something of an original checkpoint that fastprompt cannot honour exactly (eval is exact)."""


def layouts() -> dict:
    """{method: its Layout} of every registered method that has an original format."""
    from ..methods import METHODS

    return {name: cls.original_layout for name, cls in METHODS.items() if cls.original_layout}


def _layout(method: str):
    known = layouts()
    if method not in known:
        raise OriginalCheckpointError(f"no original checkpoint format for method '{method}'; "
                                      f"choose one of: {', '.join(sorted(known))}")
    return known[method]


def find_checkpoint(method: str, path) -> Path:
    """A checkpoint file, or the newest one under an original output directory:
    `<dir>/<registered>/model.pth.tar-<N>` (highest N), else `model-best.pth.tar`; for a method
    with a file of its own (CLIP-LoRA), the one file of that name in or under the directory."""
    p, layout = Path(path), _layout(method)
    if layout.find is not None:  # not a Dassl checkpoint (Tip-Adapter's cache files)
        return layout.find(layout, p)
    if p.is_file():
        return p
    if not p.is_dir():
        raise OriginalCheckpointError(f"checkpoint not found: {p}")
    if layout.file_format:
        name = layout.file_format.filename
        found = [p / name] if (p / name).is_file() else sorted(f for f in p.rglob(name) if f.is_file())
        if len(found) != 1:
            raise OriginalCheckpointError(
                f"{len(found) or 'no'} {name} under {p}" + (f" ({found[0]}, {found[1]}, ...): give "
                                                             f"one file" if found else ""))
        return found[0]
    for d in (p / layout.registered, p):
        epochs = [(int(m.group(1)), f) for f in d.glob("model.pth.tar-*")
                  if (m := re.fullmatch(r"model\.pth\.tar-(\d+)", f.name)) and f.is_file()]
        if epochs:
            return max(epochs)[1]
        if (d / "model-best.pth.tar").is_file():
            return d / "model-best.pth.tar"
    others: dict = {}
    for lay in layouts().values():
        if lay.registered and lay.registered != layout.registered and (p / lay.registered).is_dir():
            others.setdefault(lay.registered, []).append(lay.family)
    hint = "; it holds " + ", ".join(f"{r}/ ({' or '.join(f)})" for r, f in sorted(others.items())) \
        if others else ""
    raise OriginalCheckpointError(f"no {layout.registered}/model.pth.tar-<epoch> or model-best.pth.tar "
                                  f"under {p} (a {layout.family} run){hint}")


def read_state_dict(method: str, file: Path) -> tuple[dict, dict]:
    """(state dict with full original names, floating tensors upcast to fp32; the config names the
    file records about itself, {} but for a format of its own)."""
    from .unpickle import UnpickleError, safe_load

    layout = _layout(method)
    try:
        obj = safe_load(file)
    except UnpickleError as e:
        raise OriginalCheckpointError(str(e)) from None
    recorded: dict = {}
    if layout.file_format:
        raw, recorded = layout.file_format.read(obj)
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        raw = obj["state_dict"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raw = obj
    else:
        raise OriginalCheckpointError(f"{file} holds no 'state_dict': not a checkpoint of the original trainers")
    sd = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise OriginalCheckpointError(f"{file}: state-dict key {short_repr(key)} is not a "
                                          f"string: not a checkpoint of the original trainers")
        if not isinstance(value, torch.Tensor):
            raise OriginalCheckpointError(f"checkpoint key {short_repr(key)} is not a tensor "
                                          f"({short_repr(value)})")
        full = full_key(layout, key[len("module."):] if key.startswith("module.") else key)
        sd[full] = value.float() if value.is_floating_point() and not ignorable(layout, full) else value
    return sd, recorded


def load_original(method: str, path, clip, classnames, config=None):
    """A fastprompt model computing what the original code computes with these tensors.

    method: coop, cocoop, lamm, coop+lamm, maple, maple+lamm, ivlp, mma, promptsrc, kgcoop,
    clip_adapter, tip_adapter or tip_adapter_f (fastprompt names; Tip-Adapter's cache files:
    `fastprompt.methods.tip_files`; a MaPLe+LAMM checkpoint of the released code is imported with
    its label layout, `label_layout="of"`, and every LAMM checkpoint with the weight 1/shots of its
    config's `shots`).
    path: a checkpoint file or an original output directory (newest epoch is taken).
    config: original config names ({"N_CTX": 2}, {"TRAINER.MAPLE.N_CTX": 2}, nested) or a YAML path.
    """
    from ..api import create

    layout = _layout(method)
    classnames = [str(c) for c in classnames]
    file = find_checkpoint(method, path)
    if layout.read is not None:
        return _load_files(method, layout, file, clip, classnames, config)
    sd, recorded = read_state_dict(method, file)
    seen = detect(layouts().values(), [file_key(layout, k) for k in sd] if layout.owner else sd)
    if seen is None or seen[0] != layout.kind:
        what = f"looks like a {seen[0]} checkpoint (key '{seen[1]}')" if seen else "has no known key"
        raise OriginalCheckpointError(f"{file} {what}, not {layout.family}")
    cfg, unknown = read_config(layout, config, clip.name)
    if unknown:
        _warn(f"original config names ignored: {', '.join(unknown)}")
    cfg = with_recorded(cfg, recorded, file)
    options, notes = options_for(layout, sd, cfg, len(classnames))
    for note in notes:
        _warn(note)
    try:
        model = create(method, clip, classnames, **options)
    except ValueError as e:
        raise OriginalCheckpointError(f"{file}: {str(e).splitlines()[0]}") from None
    _fill(model, sd, layout)
    _check_buffers(model, sd, layout, clip)
    return model


def _load_files(method: str, layout, file: Path, clip, classnames: list, config):
    """A model from a format of its own (`Layout.read`: Tip-Adapter's cache tensors)."""
    from ..api import create

    cfg, unknown = read_config(layout, config, clip.name)
    if unknown:
        _warn(f"original config names ignored: {', '.join(unknown)}", 4)
    notes: list = []
    options, fill = layout.read(layout, file, clip, classnames, cfg, notes)
    for note in notes:
        _warn(note, 4)
    try:
        model = create(method, clip, classnames, **options)
        fill(model)
    except ValueError as e:
        raise OriginalCheckpointError(f"{file}: {str(e).splitlines()[0]}") from None
    return model


def _fill(model, sd: dict, layout) -> None:
    names = original_names(model)
    params = dict(model.named_parameters())
    unknown = sorted(k for k in sd if k not in names and not ignorable(layout, k))
    if unknown:
        raise OriginalCheckpointError(f"checkpoint key '{file_key(layout, unknown[0])}' is unknown to "
                                      f"{layout.family} as imported ({_describe(model)})")
    with torch.no_grad():
        for full, name in names.items():
            key = file_key(layout, full)
            if full not in sd:
                raise OriginalCheckpointError(f"checkpoint lacks key '{key}' that {layout.family} "
                                              f"with {_describe(model)} has")
            hint = " (m = the shortest class name in tokens: other class names?)" \
                if name == "label_emb" else f" ({_describe(model)}, from the other keys)"
            if tuple(sd[full].shape) != tuple(params[name].shape):
                raise OriginalCheckpointError(f"checkpoint key '{key}' has shape {tuple(sd[full].shape)}, "
                                              f"expected {tuple(params[name].shape)}{hint}")
            if name in layout.frozen:  # LAMM keeps "a photo of a" frozen: the file must hold it
                if not torch.allclose(sd[full].to(params[name]), params[name], atol=2e-3, rtol=1e-2):
                    raise OriginalCheckpointError(
                        f"checkpoint key '{key}' differs from the embeddings of '{model.config.ctx_init}': "
                        f"the context was trained or CTX_INIT differs: import it as coop+lamm or pass CTX_INIT")
                continue
            params[name].copy_(sd[full].to(params[name]))


def _describe(model) -> str:
    c = model.config
    fields = ("n_ctx", "depth", "csc", "start", "end", "width", "meta_ratio", "encoder", "position",
              "params", "r")
    parts = [f"{f}={getattr(c, f)}" for f in fields if hasattr(c, f)]
    return ", ".join(parts + [f"{len(model.classnames)} classes"])


def _check_buffers(model, sd: dict, layout, clip) -> None:
    """Class names against MMA's saved prompt tokens; the CLIP of a whole-model file against ours."""
    from ..clip import text_parts

    tokens = sd.get("adapter_learner.tokenized_prompts")
    if tokens is not None:
        ours = model.template.tokens.cpu()
        n = min(ours.shape[1], tokens.shape[1])
        bad = [i for i in range(len(ours)) if not torch.equal(ours[i, :n].long(), tokens[i, :n].cpu().long())]
        if bad:
            raise OriginalCheckpointError(
                f"checkpoint buffer 'tokenized_prompts' does not hold the prompt "
                f"'{model.config.prompt} {model.classnames[bad[0]]}.' of class {bad[0]}: other class "
                f"names or order, or pass TEXT_CTX_INIT")
    if not layout.ignored_prefixes:
        return
    ours = {"image_encoder.class_embedding": clip.model.visual.class_embedding,
            "text_encoder.positional_embedding": text_parts(clip.model)["positional_embedding"]}
    for key, mine in ours.items():
        theirs = sd.get(key)
        if theirs is not None and (theirs.shape != mine.shape or not torch.allclose(
                theirs.to(mine), mine, atol=1e-2, rtol=1e-2)):
            _warn(f"the CLIP weights in the checkpoint ('{key}') differ from backbone "
                  f"{clip.name} ({clip.pretrained}): outputs will differ from the original run")
            return


def _warn(msg: str, stacklevel: int = 3) -> None:
    warnings.warn(msg, OriginalCheckpointWarning, stacklevel=stacklevel)


def _dassl_layout(method: str):
    layout = _layout(method)
    if layout.read is not None:
        raise OriginalCheckpointError(f"{layout.family} saves its own files, not a state dict: "
                                      f"there is no original state dict of a {method} model")
    return layout


def original_state_dict(model) -> dict:
    """{full original name: the model's own parameter} (live tensors: writing one changes the model)."""
    _dassl_layout(model.name)
    params = dict(model.named_parameters())
    return OrderedDict((full, params[name]) for full, name in original_names(model).items())


def save_original(model, output_dir, epoch: int = 1) -> Path:
    """Write `model` as the original trainer would: `<output_dir>/<registered>/model.pth.tar-<epoch>`
    holding {"state_dict", "epoch", "optimizer", "scheduler", "val_result"} with the original keys
    (the original `load_model` reads it with strict=False, as it does its own files); a method
    with a file of its own (CLIP-LoRA): `<output_dir>/<its file name>` as its code writes it."""
    layout = _dassl_layout(model.name)
    tensors = {**original_state_dict(model), **(layout.markers(model) if layout.markers else {})}
    state = OrderedDict((file_key(layout, k), v.detach().to("cpu", torch.float32).clone())
                        for k, v in tensors.items())
    if layout.file_format:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        path = Path(output_dir) / layout.file_format.filename
        payload = layout.file_format.write(model, state)
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
        return path
    folder = Path(output_dir) / layout.registered
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"model.pth.tar-{epoch}"
    payload = {"state_dict": state, "epoch": epoch, "optimizer": None, "scheduler": None,
               "val_result": None}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path
