"""How the authors' code names each method's tensors, and how its config names map to ours.

Full original names are those of the original `CustomCLIP` (`prompt_learner.ctx`, ...). A Dassl
checkpoint holds the state dict of the module the trainer registered (`Layout.registered`), so its
keys are the full names minus `Layout.owner` (CoOp-style learners and MMA's adapter learner are
registered alone: `ctx`, `text_adapter.5.up.weight`; MaPLe and IVLP register the whole model).

Correspondences (fastprompt name <- original full name), read from the original sources:

* CoOp / CoCoOp / LAMM-CoOp: `ctx` <- `prompt_learner.ctx` ([n_ctx, D], CSC: [C, n_ctx, D]);
  `meta_net.linear{1,2}.*` <- `prompt_learner.meta_net.linear{1,2}.*`;
  `label_emb` <- `prompt_learner.token_classes` ([C, m, D]; its frozen twin `fix_token` is skipped).
* MaPLe: `proj` <- `prompt_learner.proj`; `deep_text.{i}` <- `prompt_learner.compound_prompts_text.{i}`;
  `deep_proj.{i}` <- `prompt_learner.compound_prompt_projections.{i}` (i = 0..J-2, used at layer i+1).
* IVLP (MaPLe repo, `independentVL.py`): the prompts live in the CLIP blocks: `vision.0` <-
  `image_encoder.VPT`; `vision.{i}` <- `image_encoder.transformer.resblocks.{i}.VPT_shallow` and
  `deep_text.{i-1}` <- `text_encoder.transformer.resblocks.{i}.VPT_shallow` (i = 1..J-1).
* MMA: adapters are `nn.ModuleList`s of length n_layers+1 with `None` at unused positions; block
  `layer_index = index + 1` reads position k, so k is the 1-indexed layer, as fastprompt's keys.
  `text_adapter.{k}.down.weight` <- `adapter_learner.text_adapter.{k}.down.0.weight` (down is
  Sequential(Linear, ReLU)), `up` <- `.up`, the same for `visual_adapter`, and
  `shared_adapter.{k}.weight` <- `adapter_learner.shared_adapter.{k}.0.weight`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    family: str            # what the original code calls the method
    trainers: tuple        # TRAINER.NAME values of the original trainer
    registered: str        # Dassl model name: <output_dir>/<registered>/model.pth.tar-N
    owner: str             # path of the registered module in the original CustomCLIP ("" = whole)
    section: str           # TRAINER.<section> of the original config
    ignored: tuple = ()    # full names of saved tensors that are not learned (buffers, copies)
    ignored_prefixes: tuple = ()


_PL_BUFFERS = ("prompt_learner.token_prefix", "prompt_learner.token_suffix")
_LAMM_EXTRA = ("prompt_learner.token_suffix_test", "prompt_learner.fix_token")
_CLIP = ("image_encoder.", "text_encoder.", "logit_scale")

LAYOUTS = {
    "coop": Layout("CoOp", ("CoOp",), "prompt_learner", "prompt_learner", "COOP", _PL_BUFFERS),
    "cocoop": Layout("CoCoOp", ("CoCoOp",), "prompt_learner", "prompt_learner", "COCOOP", _PL_BUFFERS),
    "lamm": Layout("LAMM (CoOp trainer, --origin-clip)", ("CoOp",), "prompt_learner",
                   "prompt_learner", "COOP", _PL_BUFFERS + _LAMM_EXTRA),
    "coop+lamm": Layout("CoOp+LAMM", ("CoOp",), "prompt_learner", "prompt_learner", "COOP",
                        _PL_BUFFERS + _LAMM_EXTRA),
    "maple": Layout("MaPLe", ("MaPLe",), "MultiModalPromptLearner", "", "MAPLE", _PL_BUFFERS, _CLIP),
    "maple+lamm": Layout("MaPLe+LAMM", ("MaPLe",), "MultiModalPromptLearner", "", "MAPLE",
                         _PL_BUFFERS + _LAMM_EXTRA, _CLIP),
    "ivlp": Layout("IVLP", ("IVLP",), "VLPromptLearner", "", "IVLP", _PL_BUFFERS, _CLIP),
    "mma": Layout("MMA", ("MultiModalAdapter",), "adapter_learner", "adapter_learner", "MMADAPTER",
                  ("adapter_learner.token_embedding", "adapter_learner.tokenized_prompts")),
}

#: config names read per section (TRAINER.<section>.<NAME>); PREC is accepted and not used
#: (fastprompt computes in fp32 or the precision it is run at)
KNOWN = {
    "COOP": {"N_CTX", "CSC", "CTX_INIT", "PREC", "CLASS_TOKEN_POSITION"},
    "COCOOP": {"N_CTX", "CTX_INIT", "PREC"},
    "MAPLE": {"N_CTX", "CTX_INIT", "PREC", "PROMPT_DEPTH"},
    "IVLP": {"N_CTX_VISION", "N_CTX_TEXT", "CTX_INIT", "PREC", "PROMPT_DEPTH_VISION", "PROMPT_DEPTH_TEXT"},
    "MMADAPTER": {"TEXT_CTX_INIT", "PREC", "ADAPTER_START", "ADAPTER_END", "ADAPTER_DIM", "ADAPTER_SCALE"},
}
#: LAMM's train.py sets these top-level cfg attributes from its command-line flags
LAMM_FLAGS = {"shots", "triplet_loss", "origin_clip", "random_init", "eval_only"}
#: sections of a Dassl config that say nothing about the learned tensors: ignored silently
SILENT = {"DATALOADER", "INPUT", "OPTIM", "TRAIN", "TEST", "DATASET", "MODEL", "SEED", "OUTPUT_DIR",
          "RESUME", "USE_CUDA", "VERBOSE", "ENV", "TRAINER.NAME"}


def _err(msg: str):
    from . import OriginalCheckpointError
    return OriginalCheckpointError(msg)


def file_key(layout: Layout, full: str) -> str:
    return full[len(layout.owner) + 1:] if layout.owner else full


def full_key(layout: Layout, key: str) -> str:
    return f"{layout.owner}.{key}" if layout.owner else key


def ignorable(layout: Layout, full: str) -> bool:
    """Saved but not learned: token buffers, LAMM's frozen copy, the CLIP of whole-model files
    (IVLP's prompts live inside that CLIP, as `...VPT...`: those are learned)."""
    return full in layout.ignored or (full.startswith(layout.ignored_prefixes) and "VPT" not in full)


def original_names(model) -> dict[str, str]:
    """{full original name: fastprompt parameter name} for every learned tensor of `model`."""
    m, wb = model.name, ("weight", "bias")
    if m == "mma":
        out = {}
        for k, t, p in ((k, t, p) for k in model.text_adapter for t in ("text", "visual") for p in wb):
            out[f"adapter_learner.{t}_adapter.{k}.down.0.{p}"] = f"{t}_adapter.{k}.down.{p}"
            out[f"adapter_learner.{t}_adapter.{k}.up.{p}"] = f"{t}_adapter.{k}.up.{p}"
            out[f"adapter_learner.shared_adapter.{k}.0.{p}"] = f"shared_adapter.{k}.{p}"
        return out
    out = {"prompt_learner.ctx": "ctx"}
    if m == "cocoop":
        out.update({f"prompt_learner.meta_net.{n}.{p}": f"meta_net.{n}.{p}"
                    for n in ("linear1", "linear2") for p in wb})
    if m.startswith("maple"):
        out.update({f"prompt_learner.proj.{p}": f"proj.{p}" for p in wb})
        for i in range(len(model.deep_text)):
            out[f"prompt_learner.compound_prompts_text.{i}"] = f"deep_text.{i}"
            out.update({f"prompt_learner.compound_prompt_projections.{i}.{p}": f"deep_proj.{i}.{p}" for p in wb})
    if m == "ivlp":
        out["image_encoder.VPT"] = "vision.0"
        for i in range(1, len(model.vision)):
            out[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = f"vision.{i}"
            out[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = f"deep_text.{i - 1}"
    if "lamm" in m:
        out["prompt_learner.token_classes"] = "label_emb"
    return out


def detect(keys) -> tuple[str, str] | None:
    """(method family, the key that tells) of a state dict, from the names alone."""
    keys = sorted(keys)

    def first(pattern):
        return next((k for k in keys if re.search(pattern, k)), None)

    for pattern, family in ((r"(^|\.)(text|visual|shared)_adapter\.\d+\.", "mma"),
                            (r"(^|\.)VPT", "ivlp"), (r"(^|\.)meta_net\.", "cocoop")):
        if first(pattern):
            return family, first(pattern)
    label = first(r"(^|\.)token_classes$")
    whole = first(r"^prompt_learner\.")  # MaPLe registers the whole model
    if whole:
        return ("maple+lamm", label) if label else ("maple", first("compound_prompt") or whole)
    if label:
        return "lamm", label
    return ("coop", "ctx") if "ctx" in keys else None


#: detected family -> the methods a checkpoint of it may be imported as
COMPATIBLE = {"coop": {"coop"}, "cocoop": {"cocoop"}, "lamm": {"lamm", "coop+lamm"}, "maple": {"maple"},
              "maple+lamm": {"maple+lamm"}, "ivlp": {"ivlp"}, "mma": {"mma"}}


def read_config(method: str, config, clip_name: str | None = None) -> tuple[dict, list[str]]:
    """The original config (mapping, nested or dotted, or a YAML path) as {NAME: value} for
    this method's section (plus LAMM's flags), and the names that were ignored as unknown.

    Unknown names are ignored with a warning (the caller's), not refused: original configs
    carry many names that do not concern the tensors. Sections that cannot matter (DATALOADER,
    OPTIM, ...) are ignored silently. TRAINER.NAME of another trainer is refused.
    """
    if config is None:
        return {}, []
    if isinstance(config, (str, bytes)) or hasattr(config, "__fspath__"):
        import yaml
        from pathlib import Path
        path = Path(config)
        if not path.is_file():
            raise _err(f"original config file not found: {path}")
        config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise _err(f"config must be a mapping or a YAML path, got {type(config).__name__}")
    flat: dict = {}

    def walk(prefix, node):
        for k, v in node.items():
            key = f"{prefix}{k}"
            walk(f"{key}.", v) if isinstance(v, dict) else flat.__setitem__(key, v)
    walk("", config)
    layout, out, unknown = LAYOUTS[method], {}, []
    for key, value in flat.items():
        parts = key.split(".")
        if key == "TRAINER.NAME" and value and value not in layout.trainers:
            raise _err(f"config TRAINER.NAME is '{value}', not the {layout.family} trainer "
                       f"({'/'.join(layout.trainers)})")
        if key == "MODEL.BACKBONE.NAME" and clip_name and str(value).replace("/", "-") != clip_name:
            unknown.append(f"{key}={value} (the backbone given is {clip_name})")
        ours = len(parts) == 1 or parts[:2] == ["TRAINER", layout.section] and len(parts) == 3
        if ours and (parts[-1] in KNOWN[layout.section] or ("lamm" in method and key in LAMM_FLAGS)):
            out[parts[-1]] = value
        elif parts[0] not in SILENT and key not in SILENT:
            unknown.append(key)
    return out, unknown


# ---------------------------------------------------------------------- structure from tensors
def _layers(sd: dict, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in sd if (m := re.fullmatch(pattern, k))})


def _contiguous(key: str, found: list[int], first: int) -> None:
    want = list(range(first, first + len(found)))
    if found != want:
        bad = (sorted(set(want) - set(found)) or [found[-1]])[0]
        raise _err(f"checkpoint key '{key.format(bad)}' breaks the run of layers {found}: "
                   f"expected consecutive layers from {first}")


def _flag(value) -> bool:  # YAML gives bools; a mapping may give "False"
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _given(cfg: dict, name: str, found, key: str) -> None:
    if cfg.get(name) is not None and int(cfg[name]) != found:
        raise _err(f"checkpoint key '{key}' says {name}={found}, the config says {cfg[name]}")


def options_for(method: str, sd: dict, cfg: dict, n_classes: int) -> tuple[dict, list[str]]:
    """fastprompt options for an original state dict `sd` (full original names, fp32), after
    cross-checking what the tensors tell against the config; and notes to warn about."""
    layout, notes = LAYOUTS[method], []
    for key in ("prompt_learner.token_prefix", "adapter_learner.tokenized_prompts"):
        if key in sd and sd[key].shape[0] != n_classes:
            raise _err(f"checkpoint key '{file_key(layout, key)}' holds {sd[key].shape[0]} "
                       f"classes but {n_classes} class names were given")
    if method == "mma":
        return _mma(sd, cfg, notes), notes
    ctx = sd.get("prompt_learner.ctx")
    if ctx is None or ctx.dim() not in (2, 3) or (ctx.dim() == 3 and method in ("cocoop", "maple",
                                                                                 "maple+lamm", "ivlp")):
        what = "missing" if ctx is None else f"of shape {tuple(ctx.shape)}"
        raise _err(f"checkpoint key '{file_key(layout, 'prompt_learner.ctx')}' is {what}: expected "
                   f"[n_ctx, D]{' or [classes, n_ctx, D] (CSC)' if layout.section == 'COOP' else ''}")
    n_ctx = ctx.shape[-2]
    if layout.owner:  # CoOp-style learners (CoOp, CoCoOp, LAMM's CoOp)
        opts = _coop(method, sd, cfg, ctx, n_classes)
    elif method == "ivlp":
        opts = _ivlp(sd, cfg, n_ctx)
    else:
        deep = _layers(sd, r"prompt_learner\.compound_prompts_text\.(\d+)")
        _contiguous("prompt_learner.compound_prompts_text.{}", deep, 0)
        _given(cfg, "N_CTX", n_ctx, "prompt_learner.ctx")
        _given(cfg, "PROMPT_DEPTH", len(deep) + 1, "prompt_learner.compound_prompts_text.*")
        opts = {"depth": len(deep) + 1}
    if not layout.owner:  # MaPLe / IVLP use CTX_INIT only when N_CTX <= 4 (LAMM's MaPLe: always)
        init = str(cfg.get("CTX_INIT", "a photo of a") or "").replace("_", " ").strip()
        opts.update(n_ctx=n_ctx, ctx_init=init if n_ctx <= 4 or method == "maple+lamm" else "")
    if "lamm" in method:
        opts.update(_lamm(method, cfg, notes))
    return opts, notes


def _coop(method: str, sd: dict, cfg: dict, ctx, n_classes: int) -> dict:
    """CoOp's rule: with CTX_INIT, n_ctx = its number of words (CSC then ignored: ctx is
    [n_ctx, D]); without, n_ctx = N_CTX and the prompt prefix is "X X ... X"."""
    n_ctx, csc = ctx.shape[-2], ctx.dim() == 3
    default = "a photo of a" if "lamm" in method else ""  # LAMM's shipped config; CoOp's code default
    init = str(cfg.get("CTX_INIT", default) or "").replace("_", " ").strip()
    if init and len(init.split(" ")) != n_ctx:
        if "CTX_INIT" in cfg:
            raise _err(f"checkpoint key 'ctx' has n_ctx={n_ctx}, CTX_INIT '{init}' has "
                       f"{len(init.split(' '))} words")
        init = ""  # the default does not fit this checkpoint: it was trained without one
    if not init:
        _given(cfg, "N_CTX", n_ctx, "ctx")
    if csc and ctx.shape[0] != n_classes:
        raise _err(f"checkpoint key 'ctx' holds {ctx.shape[0]} class-specific contexts but "
                   f"{n_classes} class names were given")
    if "CSC" in cfg and _flag(cfg["CSC"]) != csc and not (_flag(cfg["CSC"]) and init):
        raise _err(f"checkpoint key 'ctx' has shape {tuple(ctx.shape)} but the config says CSC={cfg['CSC']}")
    if str(cfg.get("CLASS_TOKEN_POSITION", "end")).lower() != "end":
        raise _err(f"CLASS_TOKEN_POSITION={cfg['CLASS_TOKEN_POSITION']!r} is not supported: "
                   f"fastprompt puts the class name after the context ('end') only")
    opts = {"n_ctx": n_ctx, "ctx_init": init}
    if method != "cocoop":
        return {**opts, "csc": csc}
    hidden, e = sd.get("prompt_learner.meta_net.linear1.weight", torch.zeros(0, 0)).shape
    if not hidden or e % hidden:
        raise _err("checkpoint key 'meta_net.linear1.weight' is missing or of an odd shape: "
                   "expected [E/16, E] (E = the CLIP embedding width)")
    return {**opts, "meta_ratio": e // hidden}


def _lamm(method: str, cfg: dict, notes: list[str]) -> dict:
    shots = int(cfg.get("shots") or 1)  # LAMM's --shots defaults to 1; its scripts never pass it
    if "origin_clip" in cfg and _flag(cfg["origin_clip"]) != (method == "lamm"):
        raise _err(f"config origin_clip={cfg['origin_clip']} means a " + (
            "frozen context: import it as lamm" if _flag(cfg["origin_clip"]) else
            "trained context: import it as coop+lamm"))
    if "triplet_loss" in cfg and not _flag(cfg["triplet_loss"]):
        notes.append("config triplet_loss=False: the original trained with cross-entropy only; "
                     "fastprompt's LAMM loss adds the three alignment terms (eval is unaffected)")
    if _flag(cfg.get("random_init")):
        notes.append("config random_init=True: the original anchored the label embeddings to random "
                     "values; fastprompt anchors them to the class-name embeddings (eval is unaffected)")
    # the parameter term is weighted 1/shots, as the original (its --shots: 1 unless passed)
    if method != "maple+lamm":
        return {"shots": shots}
    return {"shots": shots, "label_layout": "of"}  # the released MaPLe trainer's label position


def _ivlp(sd: dict, cfg: dict, n_ctx: int) -> dict:
    if "image_encoder.VPT" not in sd:
        raise _err("checkpoint lacks key 'image_encoder.VPT': IVLP without vision prompts "
                   "(PROMPT_DEPTH_VISION 0) is not supported")
    n_vis = sd["image_encoder.VPT"].shape[0]
    deep = {}
    for tower in ("text", "image"):
        key = tower + "_encoder.transformer.resblocks.{}.VPT_shallow"
        deep[tower] = _layers(sd, re.escape(key).replace(r"\{\}", r"(\d+)"))
        _contiguous(key, deep[tower], 1)
        _given(cfg, f"PROMPT_DEPTH_{'TEXT' if tower == 'text' else 'VISION'}", len(deep[tower]) + 1,
               key.format("*"))
    _given(cfg, "N_CTX_TEXT", n_ctx, "prompt_learner.ctx")
    _given(cfg, "N_CTX_VISION", n_vis, "image_encoder.VPT")
    if n_vis != n_ctx or len(deep["text"]) != len(deep["image"]):
        raise _err(f"checkpoint has {n_ctx} text / {n_vis} vision prompts over {len(deep['text']) + 1} / "
                   f"{len(deep['image']) + 1} layers: fastprompt's ivlp needs the same in both towers")
    return {"depth": len(deep["text"]) + 1}


def _mma(sd: dict, cfg: dict, notes: list[str]) -> dict:
    pattern = r"adapter_learner\.{}_adapter\.(\d+)\.{}weight"
    ks = _layers(sd, pattern.format("text", r"down\.0\."))
    if not ks:
        raise _err("checkpoint has no key 'text_adapter.K.down.0.weight': not an MMA adapter learner")
    for tower, inner in (("visual", r"down\.0\."), ("shared", r"0\.")):
        if _layers(sd, pattern.format(tower, inner)) != ks:
            raise _err(f"checkpoint has {tower}_adapter layers {_layers(sd, pattern.format(tower, inner))} "
                       f"but text_adapter layers {ks}")
    _contiguous("text_adapter.{}.down.0.weight", ks, ks[0])
    if ks[0] < 1:
        raise _err("checkpoint key 'text_adapter.0.down.0.weight': an adapter on the token "
                   "embeddings / before ln_pre (ADAPTER_START 0) is not supported")
    width = sd[f"adapter_learner.text_adapter.{ks[0]}.down.0.weight"].shape[0]
    _given(cfg, "ADAPTER_START", ks[0], "text_adapter.*")
    _given(cfg, "ADAPTER_END", ks[-1], "text_adapter.*")
    _given(cfg, "ADAPTER_DIM", width, f"text_adapter.{ks[0]}.down.0.weight")
    if "ADAPTER_SCALE" not in cfg:
        notes.append("ADAPTER_SCALE not given (it is not stored in the checkpoint): assuming 0.001, "
                     "the released configs' value; pass config={'ADAPTER_SCALE': ...} otherwise")
    scale = float(cfg.get("ADAPTER_SCALE", 0.001))  # one scale for both towers in the original
    return {"start": ks[0], "end": ks[-1], "width": width, "text_scale": scale, "vision_scale": scale,
            "grad_scale": True, "prompt": str(cfg.get("TEXT_CTX_INIT", "a photo of a") or "").strip()}
