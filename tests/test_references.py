"""Each method's logits, loss and gradients against an independent reference (tests/reference_clip.py)
on the tiny backbone: prompt placement (positions 1..n after SOS, deep prompts without position
embedding, vision prompts at the end), IVLP at depth 12, CoCoOp's per-image shift, MMA's branch
and gradient scale, and every LAMM term on a model whose learned and original label features
really differ. The references are written from METHODS.md, never with fastprompt's own helpers."""
import pytest
import torch
import torch.nn.functional as F

import fastprompt as fp

import reference_clip as R
from common import CLASSNAMES, images, tiny_clip

LONG_NAMES = ["golden retriever", "red apple", "sports car", "tabby cat", "white shark"]  # 2 tokens each


def make(method, names=CLASSNAMES, std=0.05, seed=0, **options):
    """A model whose trainable tensors are all moved well away from their init (so copies differ,
    label features differ from the original ones, and any sign or order shows)."""
    torch.manual_seed(seed)
    model = fp.create(method, tiny_clip(), names, **options)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.trainable_state().values():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def compare(model, reference, x, y, loss_atol=1e-5, grad_rtol=1e-4, scale_grads=None):
    """Our loss and every gradient vs the reference's (reference() -> (loss, eval logits))."""
    params = model.trainable_state()
    model.train().zero_grad()
    loss = model.loss(x, y)
    loss.backward()
    ref_loss, ref_logits = reference()
    ref_grads = torch.autograd.grad(ref_loss, list(params.values()))
    loss, ref_loss = float(loss.detach()), float(ref_loss.detach())
    assert abs(loss - ref_loss) <= loss_atol, (loss, ref_loss)
    for (name, p), ref in zip(params.items(), ref_grads):
        got = p.grad * (scale_grads(name) if scale_grads else 1.0)
        rel = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-20))
        assert rel < grad_rtol, f"{name}: max|Δgrad| / max|grad| = {rel:.3g}"
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_logits.detach(), atol=1e-4, rtol=1e-5)


def ce_reference(logits_fn, y):
    def run():
        s = logits_fn()
        return F.cross_entropy(s, y), s
    return run


# ------------------------------------------------------------------------------ CoOp, CoCoOp
@pytest.mark.parametrize("options, prefix", [
    pytest.param({}, "a photo of a", id="shared"),
    pytest.param({"csc": True, "ctx_init": "", "n_ctx": 3}, "X X X", id="class-specific")])
def test_coop_matches_reference(options, prefix):
    model, cm = make("coop", **options), tiny_clip().model
    x, y = images(3, seed=1), torch.tensor([0, 2, 4])
    emb, _, eot = R.prompts(cm, CLASSNAMES, prefix)

    def logits():  # [SOS] ctx_1..ctx_n {class} . [EOS], position embedding over all of it
        return R.logits(cm, R.image_features(cm, x), R.text_features(cm, R.put(emb, model.ctx, 1), eot))
    compare(model, ce_reference(logits, y), x, y)


def test_cocoop_matches_reference():
    """ctx_m(x) = ctx_m + meta_net(normalize(f(x))) for every row m, text tower once per image."""
    model, cm = make("cocoop"), tiny_clip().model
    x, y = images(3, seed=1), torch.tensor([0, 2, 4])
    emb, _, eot = R.prompts(cm, CLASSNAMES)
    net = model.meta_net

    def logits():
        img = F.normalize(R.image_features(cm, x), dim=-1)
        shift = R.linear(torch.relu(R.linear(img, net.linear1)), net.linear2)          # [B, D]
        rows = []
        for b in range(x.shape[0]):
            text = R.text_features(cm, R.put(emb, model.ctx + shift[b], 1), eot)
            rows.append(cm.logit_scale.exp() * img[b] @ F.normalize(text, dim=-1).t())
        return torch.stack(rows)
    compare(model, ce_reference(logits, y), x, y)


# ------------------------------------------------------------------------------ MaPLe, IVLP
def deep_prompt_logits(model, cm, x, emb, eot):
    """MaPLe / IVLP: shallow text ctx at rows 1..n; deep text prompt i at the input of text block
    i+1, rows 1..n; vision prompts appended after the position embedding, then the last n rows
    overwritten at blocks 1..J-1 (MaPLe: V_i = F_i(P_i), V_0 = F_0(ctx); IVLP: free tensors)."""
    n_deep = len(model.deep_text)
    text = R.text_features(cm, R.put(emb, model.ctx, 1),
                           eot, deep={i + 1: model.deep_text[i] for i in range(n_deep)})
    if model.name == "ivlp":
        shallow, deep = model.vision[0], {i: model.vision[i] for i in range(1, n_deep + 1)}
    else:
        shallow = R.linear(model.ctx, model.proj)
        deep = {i + 1: R.linear(model.deep_text[i], model.deep_proj[i]) for i in range(n_deep)}
    return R.logits(cm, R.image_features(cm, x, shallow, deep), text)


@pytest.mark.parametrize("method, n_ctx, depth", [("maple", 2, 9), ("maple", 3, 12), ("ivlp", 2, 12),
                                                  ("ivlp", 2, 9)])
def test_deep_prompts_match_reference(method, n_ctx, depth):
    model, cm = make(method, n_ctx=n_ctx, depth=depth), tiny_clip().model
    x, y = images(3, seed=1), torch.tensor([0, 2, 4])
    emb, _, eot = R.prompts(cm, CLASSNAMES)
    compare(model, ce_reference(lambda: deep_prompt_logits(model, cm, x, emb, eot), y), x, y)


# ------------------------------------------------------------------------------ MMA
@pytest.mark.parametrize("grad_scale", [False, True])
def test_mma_matches_reference(grad_scale):
    """Branch on ln_1 of the block input, added after the block, one shared layer per block;
    different scales per tower so a swap shows; the gradient-scale rule written independently."""
    ts, vs = 0.3, 0.1
    model = make("mma", text_scale=ts, vision_scale=vs, grad_scale=grad_scale, start=4, end=11)
    cm = tiny_clip().model
    x, y = images(3, seed=1), torch.tensor([0, 2, 4])
    emb, _, eot = R.prompts(cm, CLASSNAMES)

    def branches(tower, scale):
        adapters = getattr(model, f"{tower}_adapter")
        return {int(k) - 1: R.mma_branch(a.down, model.shared_adapter[k], a.up, scale, grad_scale)
                for k, a in adapters.items()}

    def logits():
        text = R.text_features(cm, emb, eot, adapters=branches("text", ts))
        return R.logits(cm, R.image_features(cm, x, adapters=branches("visual", vs)), text)
    compare(model, ce_reference(logits, y), x, y)


# ------------------------------------------------------------------------------ LAMM
def lamm_reference(model, cm, x, y, names, *, label_row, w_param, maple=False, terms=None):
    """LAMM's objective written from METHODS.md (and the released code's layout):
    CE(s, y) + w_p sum (L - L0)^2 + mean_i [1 - cos(t_{y_i}, t0_{y_i}.detach())] (only when the
    batch holds two labels) + 0.05 T^2 CE(s0 / T, softmax(s / T)), T = 2; t0 / s0 from the
    original prompt (the current context, the original rows at the label's place)."""
    emb, _, eot = R.prompts(cm, names)
    m = model.label_emb.shape[1]
    name_start = 1 + 4                                  # [SOS] a photo of a {name}
    anchor = emb[:, name_start:name_start + m]           # the labels' init: the name's first tokens
    original = R.put(emb, model.ctx, 1)
    learned = R.put(original, model.label_emb, label_row)
    deep, shallow, deep_v = {}, None, {}
    if maple:
        deep = {i + 1: p for i, p in enumerate(model.deep_text)}
        shallow = R.linear(model.ctx, model.proj)
        deep_v = {i + 1: R.linear(p, f) for i, (p, f) in enumerate(zip(model.deep_text, model.deep_proj))}
    img = R.image_features(cm, x, shallow, deep_v)
    t, t0 = R.text_features(cm, learned, eot, deep), R.text_features(cm, original, eot, deep)
    s, s0 = R.logits(cm, img, t), R.logits(cm, img, t0)
    tn, t0n = F.normalize(t, dim=-1), F.normalize(t0, dim=-1)
    T = 2.0
    parts = {
        "ce": F.cross_entropy(s, y),
        "param": w_param * ((model.label_emb - anchor) ** 2).sum(),
        "feature": ((1 - (tn[y] * t0n[y].detach()).sum(-1)).mean() if len(set(y.tolist())) > 1
                    else torch.zeros(())),
        "distill": 0.05 * T * T * R.soft_cross_entropy(s0 / T, torch.softmax(s / T, dim=-1)),
    }
    if terms is not None:
        terms.update({k: float(v.detach()) for k, v in parts.items()}, gap=float((s - s0).detach().abs().max()))
    return sum(parts.values()), s


LAMM_CASES = {  # case: (method, names, options, label row, parameter weight)
    "lamm": ("lamm", CLASSNAMES, {"shots": 4}, 5, 1 / 4),
    "lamm-2-tokens": ("lamm", LONG_NAMES, {"shots": 2}, 5, 1 / 2),
    "coop+lamm": ("coop+lamm", LONG_NAMES, {"shots": 8}, 5, 1 / 8),
    "coop+lamm-weight-1": ("coop+lamm", CLASSNAMES, {"shots": 8, "param_weight": 1}, 5, 1.0),
    "maple+lamm": ("maple+lamm", CLASSNAMES, {"shots": 4, "depth": 3}, 5, 1 / 4),
    "maple+lamm-of": ("maple+lamm", CLASSNAMES, {"shots": 4, "depth": 3, "label_layout": "of"}, 3, 1 / 4),
    "maple+lamm-released": ("maple+lamm", CLASSNAMES, {"shots": 4, "depth": 3, "released_code": True}, 3, 1.0),
}
ONE_LABEL_CASES = ["lamm", "coop+lamm", "maple+lamm-of"]


@pytest.mark.parametrize("case, labels", [pytest.param(c, [0, 1, 1, 3], id=f"{c}-two-labels") for c in LAMM_CASES]
                         + [pytest.param(c, [2, 2, 2, 2], id=f"{c}-one-label") for c in ONE_LABEL_CASES])
def test_lamm_loss_terms_match_reference(case, labels):
    method, names, options, row, w_param = LAMM_CASES[case]
    model, cm = make(method, names, **options), tiny_clip().model
    x, y = images(4, seed=3), torch.tensor(labels)
    terms = {}
    ref = lambda: lamm_reference(model, cm, x, y, names, label_row=row, w_param=w_param,  # noqa: E731
                                 maple=method.startswith("maple"), terms=terms)
    compare(model, ref, x, y)
    # the terms are big enough for a wrong sign, mask, weight or direction to show
    assert terms["param"] > 1e-3 and terms["gap"] > 0.3, terms
    assert (terms["feature"] > 1e-3) == (len(set(labels)) > 1), terms
