"""CLIP-LoRA: low-rank deltas on the attention projections of both towers (Zanella & Ben Ayed,
CVPR-W 2024; MaxZanella/CLIP-LoRA `loralib/`, `lora.py`, `main.py`).

For each adapted projection p (q, k, v by default; o optional) of each adapted block (all 12 of
both towers by default) the frozen projection gains s·B_p A_p (the weight-delta slot,
`fastprompt.lora`):

    y_p = x W_pᵀ + b_p + s · drop(x) A_pᵀ B_pᵀ,    A_p [r, d] kaiming-uniform(a=√5), B_p [d, r] zeros

with s = α/√r (loralib/layers.py `self.scaling = lora_alpha / math.sqrt(r)`; the α/r line is
commented out), r = 2, α = 1: 184,320 trainable values on ViT-B/16 (text 12·3·2·512·2 =
73,728, vision 12·3·2·768·2 = 110,592). Dropout 0.25 on the branch input only, in training only.
Training runs unmerged; eval mode and `classifier()` merge s·B A into copies of the weights (the
release's `eval()` merges in place). Logits are 100·cos (`main.py`: `logit_scale = 100`, an int,
not CLIP's exp(logit_scale)), prompted "a photo of a {}." on every dataset; the text features are
recomputed with gradients every step (through the text tower's deltas), the text tower running
before the image tower as in `run_lora` (the order of the dropout draws).

Which blocks (`position`): the release's names, per tower of n blocks (for n = 12 exactly
loralib/utils.py `INDEX_POSITIONS_*`): all, bottom / mid / up (thirds), half-bottom / half-up,
top1 (also top) / top2 / top3 (the last 1-3); or block indices "0,5,11".

Original checkpoints: `save_lora` writes `lora_weights.pt` = {"weights": {"layer_k": {"q_proj":
{"w_lora_A", "w_lora_B"}, "k_proj", "v_proj", "proj" (o)}}, "metadata": {r, alpha, encoder,
params, position}}, k counting the adapted blocks, text tower first, then vision. fastprompt's
keys are "layer_k.q_proj.w_lora_A" <- `text.{i}.q.A` (B likewise); `load_lora`'s refusal of a
metadata mismatch is kept (keys.with_recorded).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..backbone import TowerHooks
from ..lora import PROJECTIONS, LoRA
from ..errors import short_repr
from ..original.keys import FileFormat, Layout, err
from .base import Method, MethodConfig, register

#: description and recipe (methods.base.card; read by fastprompt.catalog without torch): the
#: release's one recipe, for its few-shot tables and base-to-novel alike
CARDS = {
    "clip_lora": {
        "about": "low-rank deltas (r 2) on q, k, v of every attention block of both towers (CLIP-LoRA)",
        "recipes": {
            "fewshot": {"batch_size": 32, "lr": 0.0002, "epochs": 0, "warmup_epochs": 0,
                        "iterations_per_shot": 500, "optimizer": "adamw", "betas": [0.9, 0.999],
                        "eps": 1e-08, "weight_decay": 0.01, "schedule": "iteration", "min_lr": 1e-06,
                        "crop_scale": [0.08, 1.0],
                        "source": "CLIP-LoRA run_utils.py defaults, lora.py run_lora, main.py"},
            "base2novel": {"batch_size": 32, "lr": 0.0002, "epochs": 0, "warmup_epochs": 0,
                           "iterations_per_shot": 500, "optimizer": "adamw", "betas": [0.9, 0.999],
                           "eps": 1e-08, "weight_decay": 0.01, "schedule": "iteration",
                           "min_lr": 1e-06, "crop_scale": [0.08, 1.0],
                           "source": "CLIP-LoRA run_utils.py defaults, lora.py run_lora, main.py"},
        },
    },
}

#: the release's file names of the projections (PlainMultiheadAttentionLoRA's Linear layers)
FILE_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "proj"}
#: the release's logit scale (main.py)
LOGIT_SCALE = 100.0


@dataclass
class CLIPLoRAConfig(MethodConfig):
    encoder: Literal["text", "vision", "both"] = "both"
    position: str = "all"     # a name of the release (module docstring) or block indices "0,1,2"
    params: str = "qkv"       # the adapted projections, letters of "qkvo"
    r: int = 2
    alpha: float = 1.0
    dropout: float = 0.25     # on the low-rank branch's input, in training


def blocks_at(position: str, n: int) -> list[int]:
    """The blocks of a tower of n blocks that `position` names (module docstring)."""
    name = str(position).strip().lower()
    named = {"all": range(n), "bottom": range(n // 3), "mid": range(n // 3, 2 * n // 3),
             "up": range(2 * n // 3, n), "half-bottom": range(n // 2), "half-up": range(n // 2, n),
             "top": range(n - 1, n), "top1": range(n - 1, n), "top2": range(n - 2, n),
             "top3": range(n - 3, n)}
    if name in named:
        return [i for i in named[name] if i >= 0]
    try:
        found = sorted({int(part) for part in name.split(",")})
    except ValueError:
        raise ValueError(f"position={position!r}: use one of {', '.join(named)} or block indices "
                         f"such as '0,5,11'") from None
    if not found or found[0] < 0 or found[-1] >= n:
        raise ValueError(f"position={position!r}: block indices must lie within 0..{n - 1}")
    return found



def _names(model) -> dict[str, str]:
    """{"layer_k.q_proj.w_lora_A": "text.i.q.A", ...}, k over the adapted blocks in order."""
    return {f"layer_{k}.{FILE_NAMES[p]}.w_lora_{m}": f"{tower}.{i}.{p}.{m}"
            for k, (tower, i) in enumerate(model.adapted()) for p in model.params for m in "AB"}


def _read(obj) -> tuple[dict, dict]:
    """lora_weights.pt -> ({"layer_k.q_proj.w_lora_A": tensor, ...}, what its metadata records)."""
    def nested(value, where):
        if not (isinstance(value, dict) and all(isinstance(k, str) for k in value)):
            raise err(f"{where} is not a dict with string keys: not a lora_weights.pt of "
                      f"CLIP-LoRA's save_lora")
        return value.items()

    if not (isinstance(obj, dict) and "weights" in obj):
        raise err("the file holds no 'weights': not a lora_weights.pt of CLIP-LoRA's save_lora")
    flat = {}
    for layer, projections in nested(obj["weights"], "'weights'"):
        for proj, pair in nested(projections, f"weights[{layer[:40]!r}]"):
            for name, tensor in nested(pair, f"weights[{layer[:40]!r}][{proj[:40]!r}]"):
                if not isinstance(tensor, torch.Tensor):
                    raise err(f"weights[{layer[:40]!r}][{proj[:40]!r}][{name[:40]!r}] is "
                              f"{short_repr(tensor)}, not a tensor")
                flat[f"{layer}.{proj}.{name}"] = tensor
    meta = obj.get("metadata")
    recorded = {k: meta[k] for k in RECORDED if k in meta} if isinstance(meta, dict) else {}
    for key, value in recorded.items():
        fine = (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
                if key == "params" else isinstance(value, (str, int, float)))
        if not fine or isinstance(value, bool):
            raise err(f"metadata {key!r} is {short_repr(value)}: not what save_lora writes")
    return flat, recorded


def _write(model, state: dict) -> dict:
    """What save_lora saves: nested weights and the metadata."""
    weights: dict = {}
    for key, tensor in state.items():
        layer, proj, name = key.split(".")
        weights.setdefault(layer, {}).setdefault(proj, {})[name] = tensor
    c = model.config
    alpha = int(c.alpha) if float(c.alpha).is_integer() else c.alpha
    return {"weights": weights, "metadata": {"r": c.r, "alpha": alpha, "encoder": c.encoder,
                                             "params": list(model.params), "position": c.position}}


#: what the file's metadata records (run_utils.py argument names)
RECORDED = ("r", "alpha", "encoder", "params", "position")


def _options(layout, sd, cfg, n_classes, notes) -> dict:
    missing = [k for k in RECORDED if k not in cfg]
    if missing:
        raise err(f"the file's metadata lacks {', '.join(missing)} (CLIP-LoRA's save_lora writes "
                  f"them): pass config={{{missing[0]!r}: ...}}")
    params = cfg["params"]  # a list in the file; "q k v", "qkv" or a list in a config
    params = "".join(map(str, params)) if isinstance(params, (list, tuple)) else \
        str(params).replace(" ", "").replace(",", "")
    first = next((k for k in sorted(sd) if k.startswith("layer_0.") and k.endswith("w_lora_A")), None)
    if first is None:
        raise err("checkpoint has no key 'layer_0.*.w_lora_A': no adapted block")
    if int(cfg["r"]) != sd[first].shape[0]:
        raise err(f"checkpoint key '{first}' has rank {sd[first].shape[0]}, the metadata (or the "
                  f"config) says r={cfg['r']}")
    opts = {"r": int(cfg["r"]), "alpha": float(cfg["alpha"]), "encoder": str(cfg["encoder"]),
            "params": params, "position": str(cfg["position"])}
    if cfg.get("dropout_rate") is not None:
        opts["dropout"] = float(cfg["dropout_rate"])
    return opts


class LowRank(nn.Module):
    """A [r, d_in] and B [d_out, r] of one projection, initialised as loralib does."""

    def __init__(self, width: int, r: int):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, width))
        self.B = nn.Parameter(torch.zeros(width, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))


@register("clip_lora")
class CLIPLoRA(Method):
    Config = CLIPLoRAConfig
    original_layout = Layout(
        "CLIP-LoRA", (), "", "", "", _names, _options,
        # run_utils.py's arguments: those that shape the tensors are read, the others accepted
        known=frozenset(RECORDED + ("dropout_rate", "backbone", "seed", "root_path", "dataset",
                                    "shots", "lr", "n_iters", "batch_size", "save_path", "filename",
                                    "eval_only")),
        kind="clip_lora", precedence=5,
        detect=lambda keys: next((k for k in keys if k.endswith((".w_lora_A", ".w_lora_B"))), None),
        file_format=FileFormat("lora_weights.pt", _read, _write))

    def __init__(self, clip, classnames, config):
        super().__init__(clip, classnames, config)
        if config.r < 1 or not 0.0 <= config.dropout < 1.0:
            raise ValueError(f"r={config.r}, dropout={config.dropout}: r must be >= 1 and dropout "
                             f"in [0, 1)")
        params = str(config.params).lower()
        if not params or set(params) - set(PROJECTIONS) or len(set(params)) != len(params):
            raise ValueError(f"params={config.params!r}: letters of 'qkvo', each at most once")
        self.params = [p for p in PROJECTIONS if p in params]
        self.scale = config.alpha / math.sqrt(config.r)
        bb, towers = self.backbone, {"text": ("text", "both"), "vision": ("vision", "both")}
        layers = {"text": bb.n_text_layers, "vision": bb.n_image_layers}
        widths = {"text": bb.text_width, "vision": bb.image_width}
        for tower in ("text", "vision"):  # the release's order: the text tower's modules first
            at = blocks_at(config.position, layers[tower]) if config.encoder in towers[tower] else []
            setattr(self, tower, nn.ModuleDict({str(i): nn.ModuleDict(
                {p: LowRank(widths[tower], config.r) for p in self.params}) for i in at}))

    def _slots(self, deltas: nn.ModuleDict) -> dict[int, LoRA]:
        drop = self.config.dropout if self.training else 0.0
        return {int(i): LoRA({p: m.A for p, m in d.items()}, {p: m.B for p, m in d.items()},
                             self.scale, drop) for i, d in deltas.items()}

    def _hooks(self, deltas: nn.ModuleDict, text: bool) -> TowerHooks:
        """Unmerged in training, merged into copies of the weights in eval (the release's eval)."""
        hooks = TowerHooks(lora=self._slots(deltas))
        return hooks if self.training else self.backbone.merged(hooks, text)

    def text_hooks(self) -> TowerHooks:
        return self._hooks(self.text, True)

    def image_hooks(self) -> TowerHooks:
        return self._hooks(self.vision, False)

    def logit_scale(self) -> float:
        return LOGIT_SCALE

    def text_features(self, template=None):
        template = template or self.template
        if len(self.text):
            return super().text_features(template)
        return self.cached(("text", template.key), lambda: super(CLIPLoRA, self).text_features(template))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        text = self.text_features()  # first: run_lora encodes the text, then the images
        return self.logits_from(self.image_features(images), text)

    @torch.no_grad()
    def classifier(self, classnames=None, chunk: int = 256):
        """The merged weights in both towers and no dropout, whatever the mode."""
        mode = self.training
        self.train(False)
        try:
            return super().classifier(classnames, chunk)
        finally:
            self.train(mode)

    def adapted(self) -> list[tuple[str, int]]:
        """(tower, block) of every adapted block in the release's order: text, then vision."""
        return [(t, int(i)) for t in ("text", "vision") for i in getattr(self, t)]


