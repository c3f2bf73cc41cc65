"""fastprompt's forward pass over open_clip's frozen modules, with per-layer hook points.

For layer i of either tower the runner computes (ViT pre-norm block):

    x      <- x with rows [s, s+n) replaced by prompts[i]          (prompt slot, if any)
    h       = ln_1(x)
    y       = x + attn(h)       q/k/v/o with low-rank deltas (weight-delta slot, if any; lora.py)
    y       = y + mlp(ln_2(y))
    y      <- y + alpha * adapter_i(h)                              (adapter slot, if any)

Prompt slots of the text tower start after SOS (row `text_prompt_start`, default 1); those of the
image tower are the last n rows. The image tower's layer-0 prompts are *appended* after the
position embedding, before `ln_pre` (MaPLe / VPT-deep style). The text tower's input is a token
embedding sequence built by the method (shallow prompts already substituted). A weight-delta slot
(`fastprompt.lora`: LoRA, unmerged for training, `Merged` into a copy of the block's weights for
inference) changes the attention projections of its block; its dropout masks are drawn per tower
before the tower runs (`lora.with_masks`).

`RunOptions.kernels` routes insertion+norm and the adapter branch through `fastprompt.kernels`
(Triton on CUDA); off, through their pure-torch references (`fastprompt.kernels.reference`:
`torch.cat` + `layer_norm` and the unfused branch, as the original code does). `RunOptions.truncate_text` cuts the causal text sequence to max(eot)+1 tokens: the
end-of-text feature only attends to earlier tokens, so the result is identical.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from .clip import Clip, text_parts
from .gather import gathered
from .lora import LoRA, Merged, needs_masks, with_masks


@dataclass
class RunOptions:
    """How a model runs, never what it computes: every switch is exact, and none is saved with a
    model (`Method.runtime`; `fastprompt.create(..., kernels=False)` sets them). All on is the
    fast path, all off (`plain()`) the original-style baseline."""

    kernels: bool = True        # fused Triton kernels (CUDA) for insertion+norm and adapters
    truncate_text: bool = True  # exact causal text shortcut: run max(eot)+1 tokens, not 77
    #: > 0: under autograd, run the text tower over this many sequences at a time with
    #: activation checkpointing — exact, activation memory ~ one chunk instead of every class,
    #: for one extra text forward in the backward pass (training over many classes; image x
    #: class pairs for CoCoOp)
    text_chunk: int = 0
    cache: bool = True          # exact caches of frozen activations / fixed text features (methods)

    def plain(self) -> "RunOptions":
        return replace(self, kernels=False, truncate_text=False, cache=False)


#: the names of the runtime switches (split from a method's options by `fastprompt.create`)
RUNTIME_OPTIONS = tuple(f.name for f in fields(RunOptions))


@dataclass
class Adapter:
    """One adapter slot: y + scale * up(relu(shared(relu(down(h))))) (MMA, METHODS.md)."""

    down: nn.Linear
    shared: nn.Linear
    up: nn.Linear
    scale: float
    grad_scale: bool = True

    def __call__(self, h: torch.Tensor, y: torch.Tensor, fused: bool) -> torch.Tensor:
        from fastprompt import kernels
        from fastprompt.kernels import reference

        fn = kernels.adapter_residual if fused else reference.adapter_residual
        return fn(h, y, self.down.weight, self.down.bias, self.shared.weight, self.shared.bias,
                  self.up.weight, self.up.bias, self.scale, grad_scale=self.grad_scale)


@dataclass
class SegmentedAdapter:
    """Per-segment adapters (a packed pass, `fastprompt.pack`): rows [sum(sizes)] of which the
    r-th `sizes[r]` belong to a run whose adapter is `adapters[r]`; each segment gets its own."""

    adapters: list
    sizes: list

    def __call__(self, h: torch.Tensor, y: torch.Tensor, fused: bool) -> torch.Tensor:
        parts = zip(self.adapters, torch.split(h, self.sizes), torch.split(y, self.sizes))
        return torch.cat([a(hs, ys, fused) for a, hs, ys in parts])


@dataclass
class TowerHooks:
    """What a method puts into one tower: prompt rows, adapter branches and weight deltas (LoRA,
    or the same merged into the weights), keyed by layer."""

    prompts: dict[int, torch.Tensor] = field(default_factory=dict)
    adapters: dict[int, Adapter] = field(default_factory=dict)
    lora: dict[int, LoRA | Merged] = field(default_factory=dict)


NO_HOOKS = TowerHooks()


def insert_rows(x: torch.Tensor, rows: torch.Tensor, start: int) -> torch.Tensor:
    """x [B, L, D] with rows start:start+n replaced by `rows` ([n, D] or [B, n, D]) via torch.cat."""
    n = rows.shape[-2]
    rows = rows.to(x.dtype)
    if rows.dim() == 2:
        rows = rows.unsqueeze(0).expand(x.shape[0], -1, -1)
    return torch.cat([x[:, :start], rows, x[:, start + n:]], dim=1)


class Backbone(nn.Module):
    """Runs a frozen open_clip CLIP with hooks. Holds the open_clip model as `self.model`."""

    def __init__(self, clip: Clip):
        super().__init__()
        self.clip = clip
        self.model = clip.model
        self.text = text_parts(clip.model, clip.name)
        self.visual = clip.model.visual

    def train(self, mode: bool = True):  # the backbone is frozen: it always runs in eval mode
        super().train(mode)
        self.model.eval()
        return self

    @property
    def n_text_layers(self) -> int:
        return len(self.text["blocks"])

    @property
    def n_image_layers(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def text_width(self) -> int:
        return self.text["token_embedding"].embedding_dim

    @property
    def image_width(self) -> int:
        return self.visual.conv1.out_channels

    @property
    def embed_dim(self) -> int:
        return self.visual.output_dim

    # ------------------------------------------------------------------ text tower
    def token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text["token_embedding"](tokens)

    def eot_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Row whose final feature is the sentence feature (open_clip's text pooling rule)."""
        pool = self.text["pool_type"]
        if pool == "argmax":
            return tokens.argmax(dim=-1)
        if pool == "eos":
            return (tokens == self.text["eos_id"]).int().argmax(dim=-1)
        if pool == "first":
            return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)

    def text_length(self, eot: torch.Tensor, full: int, opts: RunOptions,
                    used: int | None = None) -> int:
        """Sequence length the text tower needs: max(eot)+1 with the exact causal shortcut.
        `used` (that number, known on the host) avoids a device sync."""
        if not opts.truncate_text or self.text["pool_type"] == "last":
            return full
        return used if used is not None else int(eot.max()) + 1

    def text_input(self, emb: torch.Tensor, eot: torch.Tensor, opts: RunOptions,
                   used: int | None = None) -> torch.Tensor:
        """Token embeddings [N, L, D] -> layer-0 input (position embedding added, truncated)."""
        n = self.text_length(eot, emb.shape[1], opts, used)
        pos = self.text["positional_embedding"][:n]
        return emb[:, :n] + pos.to(emb.dtype)

    def text_blocks(self, x: torch.Tensor, hooks: TowerHooks, opts: RunOptions,
                    start: int = 0, stop: int | None = None, prompt_start: int = 1) -> torch.Tensor:
        blocks = self.text["blocks"]
        for i in range(start, len(blocks) if stop is None else stop):
            x = self._block(blocks[i], x, True, hooks.prompts.get(i) if i > 0 else None,
                            prompt_start, hooks.adapters.get(i), opts, hooks.lora.get(i))
        return x

    def text_head(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        x = self.text["ln_final"](x)  # per-token norm: pooling first is exact and cheaper
        proj = self.text["projection"]
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    @gathered
    def encode_text(self, emb: torch.Tensor, eot: torch.Tensor, hooks: TowerHooks = NO_HOOKS,
                    opts: RunOptions = RunOptions(), prompt_start: int = 1,
                    used: int | None = None) -> torch.Tensor:
        """Token embeddings [N, L, D] (prompts substituted) + end-of-text rows -> features [N, E]."""
        if needs_masks(hooks):  # at full length: the text shortcut keeps the first rows
            keep = self.text_length(eot, emb.shape[1], opts, used)
            hooks = with_masks(hooks, emb.shape[0], emb.shape[1], keep, emb.device)

        def run(emb, eot, hooks):
            x = self.text_input(emb, eot, opts, used)
            x = self.text_blocks(x, hooks, opts, prompt_start=prompt_start)
            return self.text_head(x, eot)
        return self.text_in_chunks(run, (emb, eot), hooks, opts)

    @gathered
    def text_hidden(self, emb: torch.Tensor, eot: torch.Tensor, opts: RunOptions, layers: int,
                    used: int | None = None) -> torch.Tensor:
        """The hidden states [N, n, D] entering text layer `layers`: token embeddings with the
        position embedding added (truncated as `opts` says), through the frozen layers
        0..layers-1 without hooks. Constant for a fixed prompt: what MMA caches below its adapters."""
        return self.text_blocks(self.text_input(emb, eot, opts, used), NO_HOOKS, opts, stop=layers)

    @gathered
    def encode_text_from(self, x: torch.Tensor, eot: torch.Tensor, layer: int,
                         hooks: TowerHooks = NO_HOOKS, opts: RunOptions = RunOptions(),
                         prompt_start: int = 1) -> torch.Tensor:
        """Features [N, E] from hidden states `x` entering text layer `layer` (`text_hidden`'s
        output): layers layer.. with `hooks`, then the head; in chunks as `encode_text`. LoRA
        dropout masks are drawn at the length of `x`."""
        hooks = with_masks(hooks, x.shape[0], x.shape[1], x.shape[1], x.device)

        def run(x, eot, hooks):
            x = self.text_blocks(x, hooks, opts, start=layer, prompt_start=prompt_start)
            return self.text_head(x, eot)
        return self.text_in_chunks(run, (x, eot), hooks, opts)

    @gathered
    def encode_text_per_prompt(self, emb: torch.Tensor, eot: torch.Tensor, prompts: torch.Tensor,
                               opts: RunOptions = RunOptions(), start: int = 1,
                               used: int | None = None) -> torch.Tensor:
        """The C sequences `emb` [C, L, D] once per group of prompt rows `prompts` [B, n, D]
        (written over rows start..start+n-1 of every sequence) -> features [B, C, E]: one batched
        pass over B*C sequences, cut to the tokens needed before the B-fold copy (CoCoOp)."""
        b, c = prompts.shape[0], emb.shape[0]
        n = self.text_length(eot, emb.shape[1], opts, used)
        seq = emb[:, :n].unsqueeze(0).expand(b, -1, -1, -1).reshape(b * c, n, -1)
        seq = insert_rows(seq, prompts.repeat_interleave(c, dim=0), start)
        return self.encode_text(seq, eot.repeat(b), opts=opts, used=used).view(b, c, -1)

    def text_in_chunks(self, fn, rows: tuple, hooks: TowerHooks, opts: RunOptions) -> torch.Tensor:
        """fn(*rows, hooks) -> [N, E], run over `opts.text_chunk` sequences at a time under
        activation checkpointing when autograd records (exact: the rows are independent); `rows`
        are tensors with N leading rows, and per-sequence prompts ([N, n, D]) are sliced with them."""
        n, chunk = rows[0].shape[0], opts.text_chunk
        if chunk <= 0 or n <= chunk or not torch.is_grad_enabled():
            return fn(*rows, hooks)
        from torch.utils.checkpoint import checkpoint

        def rows_of(p, cut):  # per-sequence prompts follow their rows; shared ones are kept
            return p[cut] if p.dim() == 3 and p.shape[0] == n else p

        parts = []
        for i in range(0, n, chunk):
            cut = slice(i, i + chunk)
            part = TowerHooks({k: rows_of(p, cut) for k, p in hooks.prompts.items()}, hooks.adapters,
                              {k: slot.select(cut) for k, slot in hooks.lora.items()})
            # the frozen tower draws no random numbers: no RNG state to save (and none to read
            # during CUDA-graph capture)
            parts.append(checkpoint(fn, *(r[cut] for r in rows), part, use_reentrant=False,
                                    preserve_rng_state=False))
        return torch.cat(parts)

    # ------------------------------------------------------------------ image tower
    def image_input(self, images: torch.Tensor, hooks: TowerHooks) -> torch.Tensor:
        v = self.visual
        x = v.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        shallow = hooks.prompts.get(0)
        if shallow is not None:  # appended after the position embedding, before ln_pre
            shallow = shallow.to(x.dtype)
            if shallow.dim() == 2:
                shallow = shallow.unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat([x, shallow], dim=1)
        return v.ln_pre(x)

    @gathered
    def encode_image(self, images: torch.Tensor, hooks: TowerHooks = NO_HOOKS,
                     opts: RunOptions = RunOptions()) -> torch.Tensor:
        """Images [B, 3, H, W] -> image features [B, E] (before normalisation)."""
        x = self.image_input(images, hooks)
        hooks = with_masks(hooks, x.shape[0], x.shape[1], x.shape[1], x.device)
        for i, blk in enumerate(self.visual.transformer.resblocks):
            p = hooks.prompts.get(i) if i > 0 else None
            start = x.shape[1] - p.shape[-2] if p is not None else 0
            x = self._block(blk, x, False, p, start, hooks.adapters.get(i), opts, hooks.lora.get(i))
        x = self.visual.ln_post(x[:, 0])
        return x @ self.visual.proj if self.visual.proj is not None else x

    # ------------------------------------------------------------------ one block
    def _block(self, blk, x, causal: bool, prompts, start: int, adapter: Adapter | None,
               opts: RunOptions, lora: LoRA | Merged | None = None) -> torch.Tensor:
        ln = blk.ln_1
        if prompts is not None:  # fused (kernels on) or its pure-torch reference: cat + layer_norm
            from fastprompt import kernels
            from fastprompt.kernels import reference

            insert = kernels.insert_prompts_layernorm if opts.kernels else reference.insert_prompts_layernorm
            x, h = insert(x, prompts.to(x.dtype), start, ln.weight, ln.bias, ln.eps)
        else:
            h = ln(x)
        y = x + blk.ls_1(self._attention(blk.attn, h, causal, lora, opts.kernels))
        y = y + blk.ls_2(blk.mlp(blk.ln_2(y)))
        if adapter is not None:
            y = adapter(h, y, fused=opts.kernels)
        return y

    @staticmethod
    def _attention(attn: nn.MultiheadAttention, h: torch.Tensor, causal: bool,
                   lora: LoRA | Merged | None = None, kernels: bool = True) -> torch.Tensor:
        b, n, d = h.shape
        heads = attn.num_heads
        if lora is None:
            qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
            q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2)
                       for t in lora.qkv(attn, h, kernels))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(b, n, d)
        return attn.out_proj(o) if lora is None else lora.out(attn, o, kernels)

    def merged(self, hooks: TowerHooks, text: bool) -> TowerHooks:
        """`hooks` of the text (or image) tower with every LoRA slot merged into a copy of its
        block's attention weights (`lora.LoRA.merge`): what inference and export run."""
        if not hooks.lora:
            return hooks
        blocks = self.text["blocks"] if text else self.visual.transformer.resblocks
        return replace(hooks, lora={i: s.merge(blocks[i].attn) for i, s in hooks.lora.items()})

    # ------------------------------------------------------------------ logits
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()
