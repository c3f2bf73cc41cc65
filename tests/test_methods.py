"""One matrix over every method, on the tiny backbone (CPU)."""
import pytest
import torch

import fastprompt as fp
from fastprompt.checkpoint import CheckpointError

from common import (ALL_METHODS, CLASSNAMES, TRAINING_FREE, grads, images, perturb, tiny_clip,
                    trained_count, with_cache)

TRAINABLE = [m for m in ALL_METHODS if m not in TRAINING_FREE]


def make(method, **kw):
    torch.manual_seed(0)
    return with_cache(fp.create(method, tiny_clip(), CLASSNAMES, **kw))


def expected_tiny_count(method, n_classes=len(CLASSNAMES)):
    dt, dv, e, r = 32, 48, 32, 32  # tiny widths (clip.TINY_CONFIG), MMA width 32
    coop = 4 * dt
    maple = (2 * dt + dt * dv + dv) * 9
    return {
        "zeroshot": 0,
        "coop": coop,
        "cocoop": coop + (e * (e // 16) + e // 16) + (e // 16 * dt + dt),
        "maple": maple,
        "ivlp": 12 * 2 * dt + 12 * 2 * dv,  # depth 12: the released IVLP scripts
        "mma": 8 * ((dt * r + r) + (r * dt + dt) + (dv * r + r) + (r * dv + dv) + (r * r + r)),
        "lamm": n_classes * 1 * dt,
        "coop+lamm": coop + n_classes * dt,
        "maple+lamm": maple + n_classes * dt,
        "promptsrc": 4 * dt + 8 * 4 * dt + 9 * 4 * dv,  # n_ctx 4, depth 9 in both towers
        "kgcoop": coop,
        "tip_adapter": 0,
        "tip_adapter_f": 2 * n_classes * e,  # the keys of with_cache's 2 shots per class
        "clip_adapter": e * (e // 4) * 2,
        "clip_lora": 12 * 3 * (2 * dt * 2) + 12 * 3 * (2 * dv * 2),  # r 2 on q, k, v of 12 + 12 blocks
    }[method]


def test_every_method_is_registered():
    assert set(ALL_METHODS) <= set(fp.list_methods())


@pytest.mark.parametrize("method", ALL_METHODS)
def test_trainable_count_and_frozen_backbone(method):
    model = make(method)
    assert trained_count(model) == expected_tiny_count(method)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    if method not in TRAINING_FREE:
        model.loss(images(2), torch.tensor([0, 1])).backward()
        assert all(p.grad is None for p in model.backbone.parameters())
        assert all(p.grad is not None for p in model.trainable_state().values() if p.requires_grad)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_classifier_equals_forward(method):
    model = perturb(make(method)).eval()
    x = images(3)
    with torch.no_grad():
        ref = model(x)
    clf = model.classifier()
    assert clf.caches_text == (method != "cocoop")
    assert torch.allclose(clf(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_save_load_round_trip_is_exact(method, tmp_path):
    model = perturb(make(method)).eval()
    x = images(2)
    fp.save(model, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["adapter.safetensors", "config.json"]
    again = fp.load(tmp_path / "run", clip=tiny_clip()).eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    rebuilt = fp.load(tmp_path / "run").eval()  # backbone rebuilt from the recorded seed
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


@pytest.mark.parametrize("method", TRAINABLE)
def test_loss_goes_down(method):
    model = make(method).train()
    x, y = images(4, seed=1), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.Adam(model.trainable_state().values(), lr=1e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = model.loss(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses


@pytest.mark.parametrize("method", TRAINABLE)
def test_fast_path_equals_plain_path(method):
    """Kernels (dispatched), text truncation and caches on == all off, in loss and gradients
    (each call from one RNG state: a method with dropout draws the same masks on both paths)."""
    x, y = images(3, seed=2), torch.tensor([0, 2, 4])
    fast = perturb(make(method)).train()
    plain = perturb(make(method)).train().set_fast(False)
    assert not plain.runtime.kernels and not plain.runtime.truncate_text and not plain.runtime.cache

    def loss(m):
        torch.manual_seed(3)
        return m.loss(x, y)
    for _ in range(2):  # the second call uses the caches filled by the first
        for m in (fast, plain):
            m.zero_grad()
            loss(m).backward()
        lf, lp = loss(fast), loss(plain)
        assert torch.allclose(lf, lp, atol=1e-5, rtol=1e-5)
        gf, gp = grads(fast), grads(plain)
        assert gf.keys() == gp.keys()
        for k in gf:
            scale = gp[k].abs().max().clamp_min(1e-12)
            assert ((gf[k] - gp[k]).abs().max() / scale) < 1e-4, k


@pytest.mark.parametrize("bad, message", [
    (dict(method="nope"), "unknown method 'nope'"),
    (dict(method="maple", depth=3, no_such_option=1), "unknown option 'no_such_option'"),
    (dict(method="coop", classnames=[]), "empty class list"),
    (dict(method="coop", classnames=["a", "a"]), "duplicate class names"),
    (dict(method="maple", depth=40), "depth=40"),
    (dict(method="mma", start=0), "adapter layers"),
])
def test_bad_inputs_give_clear_errors(bad, message):
    bad = dict(bad)
    method, names = bad.pop("method"), bad.pop("classnames", CLASSNAMES)
    with pytest.raises(ValueError, match=message):
        fp.create(method, tiny_clip(), names, **bad)


def test_checkpoint_of_other_backbone_or_method_is_refused(tmp_path):
    model = make("coop")
    fp.save(model, tmp_path / "run")
    with pytest.raises(CheckpointError, match="trained on backbone"):
        fp.load(tmp_path / "run", clip=fp.load_clip("tiny", pretrained=None, seed=7))
    with pytest.raises(CheckpointError, match="holds a 'coop' model"):
        fp.load(tmp_path / "run", method="maple")
    with pytest.raises(CheckpointError, match="not a fastprompt run"):
        fp.load(tmp_path)


def test_checkpoint_with_wrong_tensor_shape_is_refused(tmp_path):
    from safetensors.torch import save_file
    fp.save(make("coop"), tmp_path / "run")
    save_file({"ctx": torch.zeros(4, 99)}, str(tmp_path / "run" / "adapter.safetensors"))
    with pytest.raises(CheckpointError, match="tensor 'ctx' has shape"):
        fp.load(tmp_path / "run", clip=tiny_clip())


def _saved_bytes(fn) -> tuple[torch.Tensor, int]:
    """fn()'s result and the bytes autograd keeps for its backward (outside checkpoints)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


@pytest.mark.parametrize("method", ["coop", "maple", "cocoop", "mma", "coop+lamm"])
def test_chunked_text_tower_is_exact_and_keeps_less_for_backward(method):
    """text_chunk=k: the text tower over k sequences at a time under activation checkpointing —
    same loss and gradients, every text pass (forward and recompute) at most k sequences, and
    less kept for the backward outside the chunks (the many-class memory fix)."""
    names = [f"class number {i}" for i in range(12)]
    x, y = images(2, seed=5), torch.tensor([3, 10])
    results = {}
    for chunk in (0, 5):
        torch.manual_seed(0)
        model = perturb(fp.create(method, tiny_clip(), names, text_chunk=chunk))
        head, widths = model.backbone.text_head, []

        def counting_head(x, eot):
            widths.append(x.shape[0])
            return head(x, eot)
        model.backbone.text_head = counting_head
        loss, saved = _saved_bytes(lambda: model.loss(x, y))
        loss.backward()
        results[chunk] = loss.detach(), grads(model), saved, widths
    (l0, g0, s0, w0), (l5, g5, s5, w5) = results[0], results[5]
    torch.testing.assert_close(l5, l0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g5.keys() and g0
    for k in g0:
        torch.testing.assert_close(g5[k], g0[k], rtol=1e-4, atol=1e-6, msg=k)
    assert max(w0) > 5 and max(w5) <= 5          # whole class list vs chunks of 5
    assert sum(w5) == 2 * sum(w0)                 # each chunk run twice: forward + recompute
    assert s5 < 0.75 * s0, (s5, s0)               # measured: CoOp 22x less, MaPLe 2.1x


def test_chunked_text_tower_slices_per_sequence_prompts():
    """Deep prompts given per sequence ([N, n, D]) travel with their rows into each chunk."""
    from fastprompt.backbone import Backbone, RunOptions, TowerHooks

    bb = Backbone(tiny_clip())
    tokens = tiny_clip().tokenize([f"a photo of class {i}." for i in range(7)])
    emb, eot = bb.token_embeddings(tokens), bb.eot_index(tokens)
    g = torch.Generator().manual_seed(3)
    prompts = {i: (0.1 * torch.randn(7, 2, emb.shape[-1], generator=g)).requires_grad_()
               for i in (1, 2)}
    outs = []
    for chunk in (0, 3):
        feats = bb.encode_text(emb, eot, TowerHooks(prompts=dict(prompts)), RunOptions(text_chunk=chunk))
        grads_ = torch.autograd.grad(feats.pow(2).sum() + feats[:, 0].sum(), list(prompts.values()))
        outs.append((feats.detach(), grads_))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
