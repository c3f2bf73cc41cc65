"""CLIP-LoRA's maths against an independent reference on the tiny CLIP.

The reference is written from METHODS.md and the release (MaxZanella/CLIP-LoRA `loralib/layers.py`
LinearLoRA / PlainMultiheadAttentionLoRA, `lora.py` run_lora), on open_clip's own modules: each
block's LayerNorms and MLP are open_clip's, its attention is textbook attention over separate q, k,
v projections taken from the rows of open_clip's `in_proj_weight` (q 0:d, k d:2d, v 2d:3d), each
adapted projection adding s·(x ⊙ noise) A^T B^T with s = alpha/sqrt(r), the full 77-token text
sequence with a causal mask, logits 100·cos. Nothing of fastprompt's runner, slots or masks is used;
the dropout noise is drawn here by the release's rule (PyTorch's CPU dropout on the sequence-first
input: `empty(L, N, D).bernoulli_(1 - p).div_(1 - p)`, one per projection, text tower first, q, k,
v then o within a block).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastprompt as fp

import reference_clip as R
from common import CLASSNAMES, images, tiny_clip

POSITIONS_12 = {  # loralib/utils.py INDEX_POSITIONS_TEXT / INDEX_POSITIONS_VISION['ViT-B/16']
    "all": list(range(12)), "bottom": [0, 1, 2, 3], "mid": [4, 5, 6, 7], "up": [8, 9, 10, 11],
    "half-up": [6, 7, 8, 9, 10, 11], "half-bottom": [0, 1, 2, 3, 4, 5], "top3": [9, 10, 11]}


def attention(attn, h, deltas: dict, s: float, noise: dict, causal: bool):
    """Attention of open_clip's MultiheadAttention `attn` over h [B, L, D] with LoRA deltas
    {p: (A, B)} and dropout noise {p: [B, L, D]} on the branch input (written out)."""
    b, n, d = h.shape
    heads = attn.num_heads
    w, bias = attn.in_proj_weight, attn.in_proj_bias

    def proj(x, weight, b_, p):
        y = x @ weight.t() + b_
        if p in deltas:
            A, B = deltas[p]
            y = y + s * torch.einsum("bnd,rd,er->bne", x * noise[p] if p in noise else x, A, B)
        return y

    q, k, v = (proj(h, w[j * d:(j + 1) * d], bias[j * d:(j + 1) * d], p).view(b, n, heads, -1)
               .transpose(1, 2) for j, p in enumerate("qkv"))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if causal:
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    return proj(o, attn.out_proj.weight, attn.out_proj.bias, "o")


def tower(blocks, x, deltas: dict, s: float, noise: dict, causal: bool):
    for i, block in enumerate(blocks):
        d, nz = deltas.get(i, {}), noise.get(i, {})
        x = x + block.ls_1(attention(block.attn, block.ln_1(x), d, s, nz, causal))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x


def draw(deltas: dict, length: int, rows: int, p: float) -> dict:
    """The release's masks for one tower: block by block, q, k, v, o; [L, N, D] -> [N, L, D]."""
    out = {}
    for i in sorted(deltas):
        out[i] = {}
        for name in "qkvo":
            if name in deltas[i]:
                width = deltas[i][name][0].shape[1]
                noise = torch.empty(length, rows, width).bernoulli_(1 - p).div_(1 - p)
                out[i][name] = noise.transpose(0, 1)
    return out


def reference_logits(model, x, p: float = 0.0):
    """100·cos of the reference towers with the model's A and B (text first, as run_lora)."""
    cm, s = tiny_clip().model, model.config.alpha / math.sqrt(model.config.r)

    def deltas(tower_name):
        return {int(i): {n: (lr.A, lr.B) for n, lr in d.items()}
                for i, d in getattr(model, tower_name).items()}
    text, vision = deltas("text"), deltas("vision")
    emb, _, eot = R.prompts(cm, CLASSNAMES)
    t = tower(cm.transformer.resblocks, emb + cm.positional_embedding, text, s,
              draw(text, emb.shape[1], emb.shape[0], p) if p else {}, True)
    t = cm.ln_final(t)[torch.arange(t.shape[0]), eot] @ cm.text_projection
    v = cm.visual
    h = v.conv1(x).flatten(2).transpose(1, 2)
    h = torch.cat([v.class_embedding.view(1, 1, -1).expand(h.shape[0], 1, -1), h], 1) + v.positional_embedding
    h = v.ln_pre(h)
    noise = draw(vision, h.shape[1], h.shape[0], p) if p else {}
    h = tower(v.transformer.resblocks, h, vision, s, noise, False)
    img = v.ln_post(h[:, 0]) @ v.proj
    return 100 * F.normalize(img, dim=-1) @ F.normalize(t, dim=-1).t()


def make(seed=0, **options):
    """A model whose A and B are all moved away from their init (B from zero)."""
    torch.manual_seed(seed)
    model = fp.create("clip_lora", tiny_clip(), CLASSNAMES, **options)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.trainable_state().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def close_losses(loss, ref_loss):
    """Within fp32 rounding: the fast path folds s and 1/(1-p) into A, which moves a loss of ~6-9
    by up to ~2e-5 here (a mistake moves it by 1e-2 to 1)."""
    loss, ref = float(loss.detach()), float(ref_loss.detach())
    assert abs(loss - ref) <= 5e-6 * abs(ref) + 1e-6, (loss, ref)


CASES = [
    pytest.param({}, id="released-defaults"),
    pytest.param({"params": "qkvo", "position": "half-up", "encoder": "vision", "r": 3, "alpha": 2.0},
                 id="qkvo-half-up-vision"),
    pytest.param({"params": "kv", "position": "0,5,11", "encoder": "text", "r": 1, "alpha": 4.0},
                 id="kv-three-blocks-text"),
]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("options", CASES)
def test_clip_lora_matches_reference(options, fast):
    """Training (unmerged, dropout off): the loss and every gradient; eval (merged): the logits."""
    model = make(**options, dropout=0.0).set_fast(fast)
    x, y = images(3, seed=1), torch.tensor([0, 2, 4])
    params = model.trainable_state()
    loss = model.train().loss(x, y)
    loss.backward()
    ref_loss = F.cross_entropy(reference_logits(model, x), y)
    ref_grads = torch.autograd.grad(ref_loss, list(params.values()))
    close_losses(loss, ref_loss)
    for (name, p), ref in zip(params.items(), ref_grads):
        rel = float((p.grad - ref).abs().max() / ref.abs().max().clamp_min(1e-20))
        assert rel < 1e-4, f"{name}: max|Δgrad| / max|grad| = {rel:.3g}"
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference_logits(model, x), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("options", [pytest.param({}, id="released-defaults"),
                                     pytest.param({"params": "qkvo", "r": 4}, id="qkvo")])
def test_clip_lora_dropout_draws_the_release_masks(options, fast):
    """Dropout 0.25 from one seed: our masks are the reference's draws (order, layout, length)."""
    model = make(**options, dropout=0.25).set_fast(fast).train()
    x, y = images(3, seed=1), torch.tensor([0, 2, 4])
    params = model.trainable_state()
    torch.manual_seed(7)
    loss = model.loss(x, y)
    loss.backward()
    torch.manual_seed(7)
    ref_loss = F.cross_entropy(reference_logits(model, x, p=0.25), y)
    ref_grads = torch.autograd.grad(ref_loss, list(params.values()))
    close_losses(loss, ref_loss)
    for (name, p), ref in zip(params.items(), ref_grads):
        rel = float((p.grad - ref).abs().max() / ref.abs().max().clamp_min(1e-20))
        assert rel < 1e-4, f"{name}: max|Δgrad| / max|grad| = {rel:.3g}"
    torch.manual_seed(8)  # other draws: another loss (the masks do act)
    assert abs(float(model.loss(x, y).detach()) - float(loss.detach())) > 1e-3


def test_positions_are_the_release_tables():
    """The release's position names on 12-block towers, and ViT-L/14's 24-block vision tower."""
    from fastprompt.methods.clip_lora import blocks_at

    for name, blocks in POSITIONS_12.items():
        assert blocks_at(name, 12) == blocks, name
    assert blocks_at("half-up", 24) == list(range(12, 24)) and blocks_at("all", 24) == list(range(24))
    assert blocks_at("top", 12) == [11] and blocks_at("11, 0,5", 12) == [0, 5, 11]
    for bad in ("sideways", "0,12", "-1", ""):
        with pytest.raises(ValueError, match="position="):
            blocks_at(bad, 12)
