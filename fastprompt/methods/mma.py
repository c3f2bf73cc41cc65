"""MMA: multi-modal adapters in the upper layers of both towers, bridged by a shared layer.

For each adapter layer k (1-indexed `start`..`end`, default 5..12) of either tower:
    x_out = x + attn(ln_1(x));  x_out = x_out + mlp(ln_2(x_out)) + alpha * up(shared(down(ln_1(x))))
with down = Linear(D -> r) + ReLU, shared = Linear(r -> r) + ReLU (one module per layer, used by
both towers), up = Linear(r -> D). Every Linear: kaiming_normal_(fan_out, relu), bias 0.
With `grad_scale` the adapter weights get the gradient of the unscaled branch while the trunk
gets the ordinary one (the original gradient-scale layer); see kernels.adapter_residual.
The prompt is fixed, so the text activations entering the first adapter layer are constant per
class: with `cache` on they are computed once (exact).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..backbone import Adapter, TowerHooks
from .base import Method, MethodConfig, register


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


@register("mma")
class MMA(Method):
    Config = MMAConfig

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

    def encode_text(self, template):
        bb, first = self.backbone, self.config.start - 1

        def below_adapters():  # frozen layers 0..first-1 over the fixed prompt
            x = bb.text_input(template.embeddings, template.eot, self.opts, template.used_tokens)
            return bb.text_blocks(x, TowerHooks(), self.opts, stop=first)

        def adapted(x, eot, hooks):  # layers first.. with the adapters
            return bb.text_head(bb.text_blocks(x, hooks, self.opts, start=first), eot)

        x = self.cached(("text-prefix", template.key), below_adapters)
        return bb.text_in_chunks(adapted, (x, template.eot), self.text_hooks(), self.opts)
