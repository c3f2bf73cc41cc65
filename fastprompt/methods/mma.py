"""MMA: multi-modal adapters in the upper layers of both towers, bridged by a shared layer.

For each adapter layer k (1-indexed `start`..`end`, default 5..12) of either tower:
    x_out = x + attn(ln_1(x));  x_out = x_out + mlp(ln_2(x_out)) + alpha * up(shared(down(ln_1(x))))
with down = Linear(D -> r) + ReLU, shared = Linear(r -> r) + ReLU (one module per layer, used by
both towers), up = Linear(r -> D). Every Linear: kaiming_normal_(fan_out, relu), bias 0.
With `grad_scale` the adapter weights get the gradient of the unscaled branch while the trunk
gets the ordinary one (the original gradient-scale layer); see kernels.adapter_residual.
The prompt is fixed, so the text activations entering the first adapter layer are constant per
class: with `runtime.cache` on they are computed once (exact; `Backbone.text_hidden`).

Original checkpoints (ZjjConan/Multi-Modal-Adapter trainers/mma.py): the trainer registers the
adapter learner alone. Its adapters are `nn.ModuleList`s of length n_layers+1 with `None` at unused
positions; block `layer_index = index + 1` reads position k, so k is the 1-indexed layer, as
fastprompt's keys. `text_adapter.{k}.down.weight` <- `adapter_learner.text_adapter.{k}.down.0.weight`
(down is Sequential(Linear, ReLU)), `up` <- `.up`, the same for `visual_adapter`, and
`shared_adapter.{k}.weight` <- `adapter_learner.shared_adapter.{k}.0.weight`. ADAPTER_SCALE is not
stored: it comes from the config (default 0.001, the released configs' value).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..backbone import Adapter, TowerHooks
from ..original.keys import Layout, contiguous, err, first_key, given, layers
from .base import Method, MethodConfig, register

#: description and recipes (methods.base.card; read by fastprompt.catalog without torch)
CARDS = {
    "mma": {
        "about": "adapters in the upper layers of both towers with a shared middle layer (MMA)",
        "recipes": {"base2novel": {
            "batch_size": 16, "lr": 0.0015, "epochs": 5, "warmup_epochs": 0,
            "source": "Multi-Modal-Adapter configs/trainers/MultiModalAdapter/vit_b16_ep5.yaml"}},
        "datasets": {"imagenet": {
            "batch_size": 128,
            "source": "Multi-Modal-Adapter configs/trainers/MultiModalAdapter/vit_b16_ep5_imnet.yaml"}},
    },
}


@dataclass
class MMAConfig(MethodConfig):
    start: int = 5        # first adapter layer, 1-indexed
    end: int = 12         # last adapter layer, 1-indexed, inclusive
    width: int = 32
    text_scale: float = 0.001
    vision_scale: float = 0.001
    grad_scale: bool = True


def _linear(n_in: int, n_out: int) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(layer.bias)
    return layer


class Branch(nn.Module):
    """down -> ReLU and up of one tower at one layer (the shared middle lives in MMA.shared)."""

    def __init__(self, width: int, rank: int):
        super().__init__()
        self.down = _linear(width, rank)
        self.up = _linear(rank, width)


def _names(model) -> dict[str, str]:
    out = {}
    for k, t, p in ((k, t, p) for k in model.text_adapter for t in ("text", "visual")
                    for p in ("weight", "bias")):
        out[f"adapter_learner.{t}_adapter.{k}.down.0.{p}"] = f"{t}_adapter.{k}.down.{p}"
        out[f"adapter_learner.{t}_adapter.{k}.up.{p}"] = f"{t}_adapter.{k}.up.{p}"
        out[f"adapter_learner.shared_adapter.{k}.0.{p}"] = f"shared_adapter.{k}.{p}"
    return out


def _options(layout, sd, cfg, n_classes, notes) -> dict:
    pattern = r"adapter_learner\.{}_adapter\.(\d+)\.{}weight"
    ks = layers(sd, pattern.format("text", r"down\.0\."))
    if not ks:
        raise err("checkpoint has no key 'text_adapter.K.down.0.weight': not an MMA adapter learner")
    for tower, inner in (("visual", r"down\.0\."), ("shared", r"0\.")):
        if layers(sd, pattern.format(tower, inner)) != ks:
            raise err(f"checkpoint has {tower}_adapter layers {layers(sd, pattern.format(tower, inner))} "
                      f"but text_adapter layers {ks}")
    contiguous("text_adapter.{}.down.0.weight", ks, ks[0])
    if ks[0] < 1:
        raise err("checkpoint key 'text_adapter.0.down.0.weight': an adapter on the token "
                  "embeddings / before ln_pre (ADAPTER_START 0) is not supported")
    width = sd[f"adapter_learner.text_adapter.{ks[0]}.down.0.weight"].shape[0]
    given(cfg, "ADAPTER_START", ks[0], "text_adapter.*")
    given(cfg, "ADAPTER_END", ks[-1], "text_adapter.*")
    given(cfg, "ADAPTER_DIM", width, f"text_adapter.{ks[0]}.down.0.weight")
    if "ADAPTER_SCALE" not in cfg:
        notes.append("ADAPTER_SCALE not given (it is not stored in the checkpoint): assuming 0.001, "
                     "the released configs' value; pass config={'ADAPTER_SCALE': ...} otherwise")
    scale = float(cfg.get("ADAPTER_SCALE", 0.001))  # one scale for both towers in the original
    return {"start": ks[0], "end": ks[-1], "width": width, "text_scale": scale, "vision_scale": scale,
            "grad_scale": True, "prompt": str(cfg.get("TEXT_CTX_INIT", "a photo of a") or "").strip()}


@register("mma")
class MMA(Method):
    Config = MMAConfig
    original_layout = Layout(
        "MMA", ("MultiModalAdapter",), "adapter_learner", "adapter_learner", "MMADAPTER", _names,
        _options, known=frozenset({"TEXT_CTX_INIT", "ADAPTER_START", "ADAPTER_END", "ADAPTER_DIM",
                                   "ADAPTER_SCALE"}),
        kind="mma", detect=lambda keys: first_key(keys, r"(^|\.)(text|visual|shared)_adapter\.\d+\."),
        precedence=10, ignored=("adapter_learner.token_embedding", "adapter_learner.tokenized_prompts"))

    def __init__(self, clip, classnames, config):
        super().__init__(clip, classnames, config)
        n = min(self.backbone.n_text_layers, self.backbone.n_image_layers)
        if not 1 <= config.start <= config.end <= n:
            raise ValueError(f"adapter layers {config.start}..{config.end} must lie within 1..{n}")
        ks = [str(k) for k in range(config.start, config.end + 1)]
        r = config.width
        self.text_adapter = nn.ModuleDict({k: Branch(self.backbone.text_width, r) for k in ks})
        self.visual_adapter = nn.ModuleDict({k: Branch(self.backbone.image_width, r) for k in ks})
        self.shared_adapter = nn.ModuleDict({k: _linear(r, r) for k in ks})

    def _hooks(self, branches: nn.ModuleDict, scale: float) -> TowerHooks:
        return TowerHooks(adapters={
            int(k) - 1: Adapter(b.down, self.shared_adapter[k], b.up, scale, self.config.grad_scale)
            for k, b in branches.items()})

    def text_hooks(self) -> TowerHooks:
        return self._hooks(self.text_adapter, self.config.text_scale)

    def image_hooks(self) -> TowerHooks:
        return self._hooks(self.visual_adapter, self.config.vision_scale)

    def encode_text(self, template, embeddings=None):
        """The frozen layers below the first adapter over the fixed prompt (cached), then the
        layers with adapters; `embeddings` (another prompt) runs the whole tower."""
        bb, first = self.backbone, self.config.start - 1
        if embeddings is not None:
            return super().encode_text(template, embeddings)
        x = self.cached(("text-prefix", template.key), lambda: bb.text_hidden(
            template.embeddings, template.eot, self.opts, first, used=template.used_tokens))
        return bb.encode_text_from(x, template.eot, first, self.text_hooks(), self.opts)
