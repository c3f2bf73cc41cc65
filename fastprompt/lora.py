"""The weight-delta slot kind: low-rank deltas on the attention projections of a block (LoRA).

A method puts one `LoRA` per adapted block into `TowerHooks.lora` (block index -> LoRA). For an
adapted projection p of that block — q, k, v: rows [0:d], [d:2d], [2d:3d] of the fused
`in_proj_weight`; o: `out_proj` — the runner computes (CLIP-LoRA, `loralib/layers.py`
`LinearLoRA.forward`, the branch taken when dropout_rate > 0)

    y_p = x W_pᵀ + b_p + s · drop_p(x) (B_p A_p)ᵀ,    A_p [r, d_in], B_p [d_out, r], s = α/√r

where drop_p is dropout on the low-rank branch's input only (the frozen path sees x), with a mask
of its own for each projection, in training only (the method passes `dropout=0` otherwise).

Two ways to compute the branch, the same maths (`RunOptions.kernels`):
* off — the release's way, the original-style baseline: q, k and v each their own `F.linear` on
  their rows of the in-projection, plus `drop(x) @ (B @ A).T * s` with the d_out x d_in product
  formed on every call;
* on — the fused qkv projection, then all adapted projections' branches in one skinny matmul each
  way: u = [drop_q(x) A_qᵀ | drop_k(x) A_kᵀ | drop_v(x) A_vᵀ] [.., k·r] and qkv += u diag(B)ᵀ,
  diag(B) the block-diagonal [3d, k·r], s and 1/(1-p) folded into the [r, d] matrices A (not
  applied to the [.., d] inputs); nothing of size d x d is formed, forward or backward.

Inference uses `Merged` (`LoRA.merge`): a copy of the block's weights with s·B_p A_p added to the
rows of each adapted projection (the release's `add_lora_data`: W += (B @ A) * s), so an image pass
costs what plain CLIP's does and an export holds plain weights.

Dropout masks are the release's CPU draws, bit for bit (PyTorch's CPU dropout:
`torch.empty_like(x).bernoulli_(1 - p)`, divided by 1 - p): one per adapted projection in call
order — block by block, q, k, v, then o — on the sequence-first [L, N, D] input of the original
code (OpenAI CLIP runs sequence-first). The runner draws all masks of a tower before running it
(`with_masks`; the frozen tower draws no random numbers, so the order is the same): at full
sequence length for the text tower, of which the exact text shortcut keeps the first rows (the
same draws with and without it), and text chunks (`RunOptions.text_chunk`) slice them by sequence,
so a checkpointed chunk's recomputation sees its own masks. They are kept as booleans.

In a packed sweep (`fastprompt.pack`) the slots of several runs form one `SegmentedLoRA`: the
frozen projections run once over every run's rows, each run adds its own low-rank term to its
rows, and each run's masks are drawn, all its blocks in order, from its own random stream.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

#: the projections a LoRA slot may adapt, in the order the release calls them within a block
PROJECTIONS = ("q", "k", "v", "o")


@dataclass
class LoRA:
    """Low-rank deltas on the attention projections of one block (see the module docstring)."""

    A: dict[str, torch.Tensor]   # projection ("q", "k", "v", "o") -> [r, d_in]
    B: dict[str, torch.Tensor]   # projection -> [d_out, r]
    scale: float                 # s = alpha / sqrt(r)
    dropout: float = 0.0         # p of the branch's input; > 0 only in training
    #: projection -> bool [N, L, D] (True = kept), drawn by the runner (`with_masks`)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    def masked(self, p: str, x: torch.Tensor) -> torch.Tensor:
        """x with the zeros of projection p's dropout mask (x itself without dropout)."""
        if not self.dropout:
            return x
        if p not in self.masks:
            raise RuntimeError(f"LoRA dropout {self.dropout} on '{p}' without a mask: the runner "
                               f"draws them (lora.with_masks) before running a tower")
        return torch.where(self.masks[p], x, 0.0)

    def keep(self, like: torch.Tensor) -> torch.Tensor | float:
        """1/(1-p), rounded as the release's `noise.div_(1 - p)` rounds it."""
        if not self.dropout:
            return 1.0
        return torch.ones((), dtype=like.dtype, device=like.device).div_(1.0 - self.dropout)

    def dropped(self, p: str, x: torch.Tensor) -> torch.Tensor:
        """The release's branch input of projection p: x, or x with the mask's zeros times 1/(1-p)."""
        return self.masked(p, x) * self.keep(x) if self.dropout else x

    def down(self, p: str, x: torch.Tensor, factor) -> torch.Tensor:
        """The fast path's s·drop_p(x) A_pᵀ [.., r]: s/(1-p) (`factor`) folded into the [r, d] A."""
        return self.masked(p, x) @ (self.A[p] * factor).t()

    def qkv(self, attn, h: torch.Tensor, kernels: bool):
        """(q, k, v), each [.., n, d]: the in-projection of `h` with the deltas."""
        d, w, b = h.shape[-1], attn.in_proj_weight, attn.in_proj_bias
        if not kernels:  # the release: one Linear per projection, B @ A formed on every call
            out = []
            for j, p in enumerate("qkv"):
                rows = slice(j * d, (j + 1) * d)
                y = F.linear(h, w[rows], None if b is None else b[rows])
                if p in self.A:
                    delta = (self.B[p] @ self.A[p]).transpose(0, 1)
                    y = y + torch.matmul(self.dropped(p, h), delta) * self.scale
                out.append(y)
            return out
        qkv, delta = F.linear(h, w, b), self.qkv_delta(h)
        return (qkv if isinstance(delta, float) else qkv + delta).chunk(3, dim=-1)

    def qkv_delta(self, h: torch.Tensor) -> torch.Tensor | float:
        """The fast path's low-rank term of the fused in-projection, [.., n, 3d] (0 when no q, k or
        v is adapted)."""
        d = h.shape[-1]
        adapted = [p for p in "qkv" if p in self.A]
        if not adapted:
            return 0.0
        factor = self.keep(h) * self.scale
        if self.dropout:  # each projection its own input
            u = torch.cat([self.down(p, h, factor) for p in adapted], dim=-1)
        else:
            u = h @ (torch.cat([self.A[p] for p in adapted]) * factor).t()
        blocks = [self.B[p] if p in self.A else h.new_zeros(d, 0) for p in "qkv"]
        return u @ torch.block_diag(*blocks).t()

    def out(self, attn, o: torch.Tensor, kernels: bool) -> torch.Tensor:
        """The out-projection of the attention output `o` [.., n, d] with its delta."""
        y = attn.out_proj(o)
        if "o" not in self.A:
            return y
        if not kernels:
            A, B = self.A["o"], self.B["o"]
            return y + torch.matmul(self.dropped("o", o), (B @ A).transpose(0, 1)) * self.scale
        return y + self.out_delta(o)

    def out_delta(self, o: torch.Tensor) -> torch.Tensor | float:
        """The fast path's low-rank term of the out-projection (0 when o is not adapted)."""
        if "o" not in self.A:
            return 0.0
        return self.down("o", o, self.keep(o) * self.scale) @ self.B["o"].t()

    def needs_masks(self) -> bool:
        return self.dropout > 0 and not self.masks

    def merge(self, attn) -> "Merged":
        """The block's weights with the deltas added, W_p + (B_p @ A_p) * s (differentiable in A
        and B; inference detaches it)."""
        d, w = attn.embed_dim, attn.in_proj_weight
        in_proj = out_proj = None
        if any(p in self.A for p in "qkv"):
            rows = [w[j * d:(j + 1) * d] for j in range(3)]
            in_proj = torch.cat([r + (self.B[p] @ self.A[p]) * self.scale if p in self.A else r
                                 for r, p in zip(rows, "qkv")])
        if "o" in self.A:
            out_proj = attn.out_proj.weight + (self.B["o"] @ self.A["o"]) * self.scale
        return Merged(in_proj, out_proj)

    def select(self, rows: slice) -> "LoRA":
        """The slot for sequences `rows` of the batch (a text chunk): the masks sliced."""
        if not self.masks:
            return self
        return dataclasses.replace(self, masks={p: m[rows] for p, m in self.masks.items()})


@dataclass
class Merged:
    """One block's attention weights with its LoRA merged in (inference and export); None: the
    frozen weight, unchanged."""

    in_proj: torch.Tensor | None = None    # [3d, d]
    out_proj: torch.Tensor | None = None   # [d, d]

    def qkv(self, attn, h: torch.Tensor, kernels: bool):
        w = attn.in_proj_weight if self.in_proj is None else self.in_proj
        return F.linear(h, w, attn.in_proj_bias).chunk(3, dim=-1)

    def out(self, attn, o: torch.Tensor, kernels: bool) -> torch.Tensor:
        if self.out_proj is None:
            return attn.out_proj(o)
        return F.linear(o, self.out_proj, attn.out_proj.bias)

    def merge(self, attn) -> "Merged":
        return self

    def select(self, rows: slice) -> "Merged":
        return self

    def needs_masks(self) -> bool:  # no dropout: inference
        return False


@dataclass
class SegmentedLoRA:
    """The slots of several runs in one packed pass (`fastprompt.pack`): rows [sum(sizes)] of which
    the r-th `sizes[r]` belong to the run whose slot is `parts[r]` (all of one structure). The
    frozen projections run once over every row; each segment adds its own run's low-rank term.
    `streams[r]` (a context, `pack.RandomStream`) is what run r's dropout masks are drawn from."""

    parts: list
    sizes: list
    streams: list

    def _split(self, x):
        return zip(self.parts, torch.split(x, self.sizes))

    def qkv(self, attn, h: torch.Tensor, kernels: bool):
        if not kernels:  # each run the release's way on its rows
            return [torch.cat(t) for t in zip(*(p.qkv(attn, x, False) for p, x in self._split(h)))]
        base = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
        deltas = [p.qkv_delta(x) for p, x in self._split(h)]
        if all(isinstance(d, float) for d in deltas):
            return base.chunk(3, dim=-1)
        return (base + torch.cat(deltas)).chunk(3, dim=-1)

    def out(self, attn, o: torch.Tensor, kernels: bool) -> torch.Tensor:
        if not kernels:
            return torch.cat([p.out(attn, x, False) for p, x in self._split(o)])
        y = attn.out_proj(o)
        deltas = [p.out_delta(x) for p, x in self._split(o)]
        return y if all(isinstance(d, float) for d in deltas) else y + torch.cat(deltas)

    def select(self, rows: slice) -> "SegmentedLoRA":
        """The segments' parts within sequences `rows` (a text chunk)."""
        parts, sizes, streams, at = [], [], [], 0
        for part, size, stream in zip(self.parts, self.sizes, self.streams):
            lo, hi = max(rows.start, at), min(rows.stop, at + size)
            if lo < hi:
                parts.append(part.select(slice(lo - at, hi - at)))
                sizes.append(hi - lo)
                streams.append(stream)
            at += size
        return SegmentedLoRA(parts, sizes, streams)

    def needs_masks(self) -> bool:
        return any(p.needs_masks() for p in self.parts)


def needs_masks(hooks) -> bool:
    """Whether a LoRA slot of `hooks` (backbone.TowerHooks) drops out without its masks yet."""
    return any(s.needs_masks() for s in hooks.lora.values())


def with_masks(hooks, rows: int, length: int, keep: int, device):
    """`hooks` (backbone.TowerHooks) with the dropout masks of every LoRA slot drawn: for each
    adapted projection, block by block in `PROJECTIONS` order, `torch.empty(length, rows, D)
    .bernoulli_(1 - p)` (the release's sequence-first draw), of which the first `keep` positions
    are kept, as bool [rows, keep, D]."""
    if not needs_masks(hooks):
        return hooks
    if any(isinstance(s, SegmentedLoRA) for s in hooks.lora.values()):
        return _segmented_masks(hooks, length, keep, device)
    out = {}
    for i in sorted(hooks.lora):
        slot = hooks.lora[i]
        if not (isinstance(slot, LoRA) and slot.dropout > 0):
            out[i] = slot
            continue
        masks = {}
        for p in PROJECTIONS:
            if p in slot.A:
                width = slot.A[p].shape[1]
                noise = torch.empty(length, rows, width, device=device).bernoulli_(1.0 - slot.dropout)
                masks[p] = noise[:keep].transpose(0, 1).to(torch.bool,
                                                           memory_format=torch.contiguous_format)
        out[i] = dataclasses.replace(slot, masks=masks)
    return dataclasses.replace(hooks, lora=out)


def _segmented_masks(hooks, length: int, keep: int, device):
    """with_masks of a packed pass (every slot a SegmentedLoRA): each run's masks, all its blocks
    in order, drawn from its own stream as its solo pass draws them."""
    slots = hooks.lora
    first = next(iter(slots.values()))
    drawn = []
    for r, (size, stream) in enumerate(zip(first.sizes, first.streams)):
        own = dataclasses.replace(hooks, lora={i: s.parts[r] for i, s in slots.items()})
        with stream:
            drawn.append(with_masks(own, size, length, keep, device).lora)
    return dataclasses.replace(hooks, lora={i: dataclasses.replace(s, parts=[d[i] for d in drawn])
                                            for i, s in slots.items()})
