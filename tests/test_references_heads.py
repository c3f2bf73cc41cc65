"""Tip-Adapter(-F) and CLIP-Adapter against references written from the released code, on open_clip's
own encoders (`encode_image` / `encode_text`, nothing of fastprompt's runner, prompts or heads):

* gaopengcuhk/Tip-Adapter utils.py `clip_classifier` (each template normalised, averaged,
  normalised), `build_cache_model` (the UNNORMALISED features of the augmented passes averaged,
  then normalised; one-hot values), main.py's logits `100.*f@W + exp(-(beta - beta*f@K))@V*alpha`,
  Tip-Adapter-F's loss through `adapter.weight`, and `search_hp`'s loop (beta outer, alpha inner,
  the first strictly better point kept; (0, 0) when nothing beats 0 %);
* gaopengcuhk/CLIP-Adapter clip_adapter.py: `Adapter` (two bias-free Linears, ReLU after both),
  `0.2*a + 0.8*f` on the unnormalised feature, then CLIP's logits.
"""
import pytest
import torch
import torch.nn.functional as F

import fastprompt as fp
from common import CLASSNAMES, images, tiny_clip
from fastprompt.methods.tip_search import grid

TEMPLATES = ["a photo of a {}.", "a drawing of the {}.", "{} in the wild."]


def ref_text(clip, names, templates):
    """utils.py clip_classifier: W [E, C]."""
    m = clip.model
    columns = []
    with torch.no_grad():
        for name in names:
            e = m.encode_text(clip.tokenize([t.format(name.replace("_", " ")) for t in templates]))
            e = e / e.norm(dim=-1, keepdim=True)
            e = e.mean(dim=0)
            columns.append(e / e.norm())
    return torch.stack(columns, dim=1)


def ref_cache(clip, views, labels, n_classes):
    """utils.py build_cache_model: keys [E, NK] from the augmented passes, one-hot values."""
    with torch.no_grad():
        keys = torch.stack([clip.model.encode_image(v) for v in views]).mean(dim=0)
    keys = keys / keys.norm(dim=-1, keepdim=True)
    return keys.permute(1, 0), F.one_hot(labels, n_classes).float()


def ref_features(clip, x):
    with torch.no_grad():
        f = clip.model.encode_image(x)
    return f / f.norm(dim=-1, keepdim=True)


def ref_tip(f, W, affinity, values, alpha, beta):
    """main.py run_tip_adapter(_F)'s logits."""
    cache_logits = ((-1) * (beta - beta * affinity)).exp() @ values
    return 100. * f @ W + cache_logits * alpha


def cache_views(n, shots=2):
    """Two augmented passes of n*shots images whose feature norms differ (so averaging before or
    after normalising gives different keys)."""
    base = images(n * shots, seed=11)
    return [base, 2.5 * base + 0.3 * images(n * shots, seed=12)], torch.arange(n).repeat(shots)


def tip_model(method, **options):
    clip = tiny_clip()
    torch.manual_seed(0)
    model = fp.create(method, clip, CLASSNAMES, templates=TEMPLATES, **options)
    views, labels = cache_views(len(CLASSNAMES))
    model.build_cache(torch.stack([model.encode(v) for v in views]), labels)
    return model, views, labels


@pytest.mark.parametrize("alpha, beta", [(1.17, 1.0), (10.0, 5.5)])
def test_tip_adapter_logits_match_reference(alpha, beta):
    model, views, labels = tip_model("tip_adapter", alpha=alpha, beta=beta)
    clip = model.clip
    W = ref_text(clip, CLASSNAMES, TEMPLATES)
    keys, values = ref_cache(clip, views, labels, len(CLASSNAMES))
    torch.testing.assert_close(model.cache_keys.detach(), keys.t(), atol=1e-5, rtol=0)
    x = images(4, seed=3)
    f = ref_features(clip, x)
    want = ref_tip(f, W, f @ keys, values, alpha, beta)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-4, rtol=0)
        torch.testing.assert_close(model.classifier()(x), want, atol=1e-4, rtol=0)


def test_tip_adapter_f_loss_and_grad_match_reference():
    model, views, labels = tip_model("tip_adapter_f", alpha=3.0, beta=2.0)
    clip = model.clip
    W = ref_text(clip, CLASSNAMES, TEMPLATES)
    keys, values = ref_cache(clip, views, labels, len(CLASSNAMES))
    weight = keys.t().clone().requires_grad_()  # the release's adapter.weight = cache_keys.t()
    x, y = images(4, seed=5), torch.tensor([0, 2, 4, 1])
    f = ref_features(clip, x)
    ref_loss = F.cross_entropy(ref_tip(f, W, f @ weight.t(), values, 3.0, 2.0), y)
    ref_loss.backward()
    model.train()
    loss = model.loss(x, y)
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    assert set(n for n, p in model.trainable_state().items() if p.requires_grad) == {"cache_keys"}
    rel = (model.cache_keys.grad - weight.grad).abs().max() / weight.grad.abs().max()
    assert rel < 1e-4, rel


def ref_search(features, labels, W, keys, values, scale):
    """utils.py search_hp, line by line: (correct counts [200, 20], best beta, best alpha)."""
    betas, alphas = grid(scale[0], 200), grid(scale[1], 20)
    counts = torch.zeros(200, 20, dtype=torch.long)
    best_acc, best_beta, best_alpha = 0, 0, 0
    for i, beta in enumerate(betas):
        for j, alpha in enumerate(alphas):
            affinity = features @ keys
            cache_logits = ((-1) * (beta - beta * affinity)).exp() @ values
            clip_logits = 100. * features @ W
            tip_logits = clip_logits + cache_logits * alpha
            pred = tip_logits.topk(1, 1, True, True)[1].t()
            counts[i, j] = int(pred.eq(labels.view(1, -1)).sum())
            acc = 100 * float(counts[i, j]) / labels.shape[0]
            if acc > best_acc:
                best_acc, best_beta, best_alpha = acc, beta, alpha
    return counts, best_beta, best_alpha


def shapes_data(n_classes=12, shots=2, val=4):
    """Real structure: the shipped pretrained tiny CLIP on its generated shapes (a dataset and
    sizes where the accuracy really varies over the grid)."""
    from fastprompt.data import load_dataset, test_transform

    clip = fp.load_clip("tiny", pretrained="shapes")
    d = load_dataset("shapes_texture")
    tf = test_transform(clip.image_size, clip.mean, clip.std)

    def take(items, k):
        picked = [[x for x in items if x.label == c][:k] for c in range(n_classes)]
        flat = [x for group in picked for x in group]
        return torch.stack([tf(x.image) for x in flat]), torch.tensor([x.label for x in flat])
    return clip, d.classnames[:n_classes], take(d.train, shots), take(d.test, val)


@pytest.mark.parametrize("scale, drop", [((7, 3), 0), ((50, 50), 0), ((12, 10), 3)],
                         ids=["imagenet-grid", "flowers-grid", "uneven-cache"])
def test_search_matches_the_release_loop(scale, drop):
    """Every grid point's accuracy equals the release loop's, and so does the winner (uneven:
    classes with fewer keys, the index_add path)."""
    clip, names, (xs, ys), (xv, yv) = shapes_data()
    xs, ys = xs[drop:], ys[drop:]
    model = fp.create("tip_adapter", clip, names, search_beta=scale[0], search_alpha=scale[1])
    model.build_cache(model.encode(xs), ys)
    fv = F.normalize(model.encode(xv), dim=-1)
    found = model.search(fv, yv)
    W = model.text_features().t()
    keys, values = model.cache_keys.detach().t(), F.one_hot(ys, len(names)).float()
    counts, beta, alpha = ref_search(fv, yv, W, keys, values, scale)
    assert counts.unique().numel() > 2  # the grid is not flat: the test can see a wrong point
    assert torch.equal(found["grid"], counts)
    assert (model.config.beta, model.config.alpha) == (beta, alpha)


def test_search_that_finds_nothing_gives_zero_as_the_release():
    """Every image looks like class 0 and is labelled 1: no grid point is ever right, and the
    release then returns (beta, alpha) = (0, 0) (best_acc starts at 0, kept only when beaten)."""
    model = fp.create("tip_adapter", tiny_clip(), CLASSNAMES[:3])
    e = torch.eye(model.backbone.embed_dim)
    model.text_features = lambda *args: e[:3]  # class c's text feature: the c-th axis
    model.set_cache(-e[:1].repeat(4, 1), torch.ones(4))  # keys far from every image
    found = model.search(e[:1].repeat(5, 1), torch.ones(5, dtype=torch.long))
    assert int(found["grid"].max()) == 0 and found["val_acc"] == 0
    assert (model.config.beta, model.config.alpha) == (0.0, 0.0)
    found = model.search(e[1:2].repeat(5, 1), torch.ones(5, dtype=torch.long))  # now all right
    assert found["val_acc"] == 100 and (model.config.beta, model.config.alpha) == (0.1, 0.1)


@pytest.mark.parametrize("ratio", [0.2, 0.6])
def test_clip_adapter_matches_reference(ratio):
    clip = tiny_clip()
    torch.manual_seed(0)
    model = fp.create("clip_adapter", clip, CLASSNAMES, ratio=ratio)
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.normal_(0, 0.3)
    w1, w2 = (model.adapter.fc[i].weight.detach().clone().requires_grad_() for i in (0, 2))
    x, y = images(4, seed=7), torch.tensor([1, 0, 3, 4])
    with torch.no_grad():
        f = clip.model.encode_image(x)
        t = clip.model.encode_text(clip.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in CLASSNAMES]))
    a = torch.relu(torch.relu(f @ w1.t()) @ w2.t())
    mixed = ratio * a + (1 - ratio) * f
    mixed = mixed / mixed.norm(dim=-1, keepdim=True)
    t = t / t.norm(dim=-1, keepdim=True)
    want = clip.model.logit_scale.exp() * mixed @ t.t()
    F.cross_entropy(want, y).backward()
    loss = model.train().loss(x, y)
    loss.backward()
    assert abs(loss.item() - F.cross_entropy(want, y).item()) < 1e-5
    for mine, ref in ((model.adapter.fc[0].weight.grad, w1.grad), (model.adapter.fc[2].weight.grad, w2.grad)):
        assert (mine - ref).abs().max() / ref.abs().max() < 1e-4
    assert not any(p.grad is not None for p in model.backbone.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), want.detach(), atol=1e-4, rtol=0)
        torch.testing.assert_close(model.classifier()(x), want.detach(), atol=1e-4, rtol=0)
