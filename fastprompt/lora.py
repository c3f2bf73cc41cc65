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

In a packed sweep (`fastprompt.pack`) calls with LoRA slots are not merged: each run's tower
passes run one after the other, each drawing its masks from its own run's random stream, so a
packed run equals its solo run. Merging them would give A and B a leading run dimension and the
slot an index of each sample's run (a batched matmul in the low-rank form); not built.
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
        qkv = F.linear(h, w, b)
        adapted = [p for p in "qkv" if p in self.A]
        if adapted:
            factor = self.keep(h) * self.scale
            if self.dropout:  # each projection its own input
                u = torch.cat([self.down(p, h, factor) for p in adapted], dim=-1)
            else:
                u = h @ (torch.cat([self.A[p] for p in adapted]) * factor).t()
            blocks = [self.B[p] if p in self.A else h.new_zeros(d, 0) for p in "qkv"]
            qkv = qkv + u @ torch.block_diag(*blocks).t()
        return qkv.chunk(3, dim=-1)

    def out(self, attn, o: torch.Tensor, kernels: bool) -> torch.Tensor:
        """The out-projection of the attention output `o` [.., n, d] with its delta."""
        y = attn.out_proj(o)
        if "o" not in self.A:
            return y
        A, B = self.A["o"], self.B["o"]
        if not kernels:
            return y + torch.matmul(self.dropped("o", o), (B @ A).transpose(0, 1)) * self.scale
        return y + self.down("o", o, self.keep(o) * self.scale) @ B.t()

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


def needs_masks(hooks) -> bool:
    """Whether a LoRA slot of `hooks` (backbone.TowerHooks) drops out without its masks yet."""
    return any(isinstance(s, LoRA) and s.dropout > 0 and not s.masks for s in hooks.lora.values())


def with_masks(hooks, rows: int, length: int, keep: int, device):
    """`hooks` (backbone.TowerHooks) with the dropout masks of every LoRA slot drawn: for each
    adapted projection, block by block in `PROJECTIONS` order, `torch.empty(length, rows, D)
    .bernoulli_(1 - p)` (the release's sequence-first draw), of which the first `keep` positions
    are kept, as bool [rows, keep, D]."""
    if not needs_masks(hooks):
        return hooks
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
