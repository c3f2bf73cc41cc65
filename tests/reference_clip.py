"""Independent reference forward passes of the methods, for tests (not a test module).

Written from METHODS.md and the original code, on open_clip's own modules only: each block is run
by its own `forward` (the full 77-token text sequence with open_clip's causal mask, no truncation),
and nothing of fastprompt's runner, prompt templates, kernels or losses is used. Placement facts,
as in MaPLe's `clip/model.py` (`ResidualAttentionBlock_MaPLe`) and MMA's `clip/model.py`:

* text: shallow prompts replace token embeddings after SOS *before* the position embedding is
  added; a deep prompt of block i (i >= 1) overwrites rows 1..n of the stream at that block's
  input (no position embedding);
* vision: the shallow prompts are appended after the 197 (here 17) tokens, after the position
  embedding and before `ln_pre`; a deep prompt of block i overwrites the last n rows;
* an adapter of block i adds `fn(ln_1(x))` of the block input x to the block output.
"""
from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F


def put(x: torch.Tensor, rows: torch.Tensor, start: int) -> torch.Tensor:
    """x [B, L, D] with rows start..start+n replaced by `rows` ([n, D] or [B, n, D])."""
    rows = rows.expand(x.shape[0], *rows.shape[-2:]) if rows.dim() == 2 else rows
    return torch.cat([x[:, :start], rows, x[:, start + rows.shape[1]:]], dim=1)


def tokens(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP BPE ids [N, 77] and the end-of-text row of each (the largest id, as in CLIP)."""
    ids = open_clip.tokenize(texts)
    return ids, ids.argmax(dim=-1)


def prompts(model, classnames: list[str], prefix: str = "a photo of a"):
    """Token embeddings [C, 77, D] of "{prefix} {name}.", the ids and the end-of-text rows."""
    ids, eot = tokens([f"{prefix} {c.replace('_', ' ')}." for c in classnames])
    with torch.no_grad():
        emb = model.token_embedding(ids)
    return emb, ids, eot


def text_features(model, emb, eot, deep: dict | None = None, adapters: dict | None = None):
    """Un-normalised text features [N, E] of token embeddings `emb` [N, 77, D]."""
    deep, adapters = deep or {}, adapters or {}
    x = emb + model.positional_embedding
    for i, block in enumerate(model.transformer.resblocks):
        if i in deep:
            x = put(x, deep[i], 1)
        y = block(x, attn_mask=model.attn_mask)
        if i in adapters:
            y = y + adapters[i](block.ln_1(x))
        x = y
    x = model.ln_final(x)[torch.arange(x.shape[0]), eot]
    return x @ model.text_projection


def image_features(model, images, shallow=None, deep: dict | None = None, adapters: dict | None = None):
    """Un-normalised image features [B, E]; `shallow` [n, W] appended, `deep` {block: [n, W]}."""
    deep, adapters = deep or {}, adapters or {}
    v = model.visual
    b = images.shape[0]
    x = v.conv1(images).flatten(2).transpose(1, 2)                     # [B, 16, W]
    cls = v.class_embedding.view(1, 1, -1).expand(b, 1, -1)
    x = torch.cat([cls, x], dim=1) + v.positional_embedding
    if shallow is not None:
        x = torch.cat([x, shallow.expand(b, *shallow.shape)], dim=1)
    x = v.ln_pre(x)
    for i, block in enumerate(v.transformer.resblocks):
        if i in deep:
            x = put(x, deep[i], x.shape[1] - deep[i].shape[-2])
        y = block(x)
        if i in adapters:
            y = y + adapters[i](block.ln_1(x))
        x = y
    return v.ln_post(x[:, 0]) @ v.proj


def logits(model, image_feats, text_feats):
    """CLIP's logits: exp(logit_scale) * cos(image, text)."""
    return model.logit_scale.exp() * F.normalize(image_feats, dim=-1) @ F.normalize(text_feats, dim=-1).t()


def linear(x, layer):
    """x @ W.T + b written out (so a reference never calls the module it checks)."""
    return x @ layer.weight.t() + layer.bias


def mma_branch(down, shared, up, scale: float, grad_scale: bool):
    """MMA's branch h -> scale * up(relu(shared(relu(down(h))))) (METHODS.md). With `grad_scale`
    the original gradient-scale layer (MMA `clip/gsl.py`): the value and the gradient into h are
    those of the scaled branch, the weights get the gradient of the unscaled one."""
    def f(h, detach_weights=False):
        lin = (lambda x, m: x @ m.weight.detach().t() + m.bias.detach()) if detach_weights else linear
        return lin(torch.relu(lin(torch.relu(lin(h, down)), shared)), up)

    def branch(h):
        if not grad_scale:
            return scale * f(h)
        weights_only = f(h.detach())
        return scale * f(h, detach_weights=True) + (weights_only - weights_only.detach())
    return branch


def soft_cross_entropy(inputs, target_probs):
    """mean_i sum_c -p_ic log softmax(inputs)_ic, written out."""
    return -(target_probs * torch.log_softmax(inputs, dim=-1)).sum(-1).mean()
