"""Method-specific facts of METHODS.md: ViT-B/16 counts, slots, coupling, MMA's rules, LAMM, CoCoOp."""
import pytest
import torch
import torch.nn.functional as F

import fastprompt as fp
from fastprompt.backbone import TowerHooks

from common import CLASSNAMES, images, perturb, tiny_clip

VIT_B16_COUNTS = {"coop": 2048, "cocoop": 35360, "maple": 3555072, "ivlp": 30720, "mma": 674560,
                  "zeroshot": 0, "promptsrc": 46080, "kgcoop": 2048, "clip_lora": 184320}


@pytest.fixture(scope="module")
def vit_b16():
    return fp.load_clip("ViT-B-16", pretrained=None, seed=0)


def count(model):
    return sum(p.numel() for p in model.trainable_state().values())


def test_vit_b16_parameter_counts(vit_b16):
    """Counts of METHODS.md; IVLP at the released scripts' depth 12 in both towers
    (multimodal-prompt-learning configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml)."""
    names = ["dog", "cat", "sports car", "golden retriever", "tench"]
    for method, n in VIT_B16_COUNTS.items():
        assert count(fp.create(method, vit_b16, names)) == n, method
    m = min(len(vit_b16.tokenize([c])[0].nonzero()) - 2 for c in names)
    assert count(fp.create("lamm", vit_b16, names)) == len(names) * m * 512
    assert count(fp.create("coop+lamm", vit_b16, names)) == 2048 + len(names) * m * 512
    assert count(fp.create("maple+lamm", vit_b16, names)) == 3555072 + len(names) * 1 * 512


def test_clip_lora_counts_per_tower(vit_b16):
    """CLIP-LoRA on ViT-B/16 (METHODS.md): text 12 x 3 x (2x512 + 512x2) = 73,728, vision
    12 x 3 x (2x768 + 768x2) = 110,592; with o as well 4/3 of that; r 4 twice r 2."""
    names = ["dog", "cat"]
    for options, n in (({"encoder": "text"}, 73728), ({"encoder": "vision"}, 110592),
                       ({"params": "qkvo"}, 245760), ({"r": 4}, 368640), ({"position": "top3"}, 46080)):
        assert count(fp.create("clip_lora", vit_b16, names, **options)) == n, options


def test_maple_structure(vit_b16):
    model = fp.create("maple", vit_b16, ["dog", "cat"])
    # shallow text context = embeddings of "a", "photo"; deep couplings start identical
    tok = vit_b16.tokenize(["a photo"])
    assert torch.equal(model.ctx, model.backbone.token_embeddings(tok)[0, 1:3])
    w = [f.weight for f in model.deep_proj]
    assert all(torch.equal(w[0], wi) for wi in w[1:]) and not torch.equal(model.proj.weight, w[0])
    hooks = model.image_hooks()
    assert sorted(hooks.prompts) == list(range(9)) and hooks.prompts[0].shape == (2, 768)
    assert sorted(model.text_hooks().prompts) == list(range(1, 9))
    # 199 image tokens: 197 + 2 appended prompts
    x = model.backbone.image_input(torch.randn(1, 3, 224, 224), hooks)
    assert x.shape == (1, 199, 768)


def test_maple_vision_prompts_are_appended_after_position_embedding():
    clip = tiny_clip()
    model = perturb(fp.create("maple", clip, CLASSNAMES))
    bb = model.backbone
    x = images(1)
    hooks = model.image_hooks()
    got = bb.image_input(x, hooks)
    plain = bb.image_input(x, TowerHooks())
    assert torch.allclose(got[:, :-2], plain, atol=1e-6)
    assert torch.allclose(got[0, -2:], clip.model.visual.ln_pre(hooks.prompts[0]), atol=1e-6)


def test_mma_cache_equals_uncached():
    model = perturb(fp.create("mma", tiny_clip(), CLASSNAMES))
    a = model.text_features()          # fills the layer-4 cache
    b = model.text_features()          # reads it
    model.runtime.cache = False
    c = model.text_features()
    assert model._cache and torch.allclose(a, b) and torch.allclose(b, c, atol=1e-6)


def test_mma_gradient_scale_rule():
    """Adapters get the gradient of the unscaled branch; the trunk gets the ordinary one."""
    x, y = images(2), torch.tensor([0, 1])
    out = {}
    for rule in (True, False):
        torch.manual_seed(0)
        model = fp.create("mma", tiny_clip(), CLASSNAMES, grad_scale=rule)
        x_in = x.clone().requires_grad_(True)
        model.loss(x_in, y).backward()
        out[rule] = (model.visual_adapter["12"].up.weight.grad.clone(), x_in.grad.clone())
    (w_on, dx_on), (w_off, dx_off) = out[True], out[False]
    assert torch.allclose(w_on * 0.001, w_off, rtol=1e-4, atol=1e-10)
    assert torch.allclose(dx_on, dx_off, rtol=1e-4, atol=1e-9)


def test_mma_init_and_sharing():
    model = fp.create("mma", tiny_clip(), CLASSNAMES)
    t, v = model.text_hooks(), model.image_hooks()
    assert sorted(t.adapters) == list(range(4, 12)) == sorted(v.adapters)
    assert all(t.adapters[i].shared is v.adapters[i].shared for i in t.adapters)
    assert all(float(b.up.bias.detach().abs().sum()) == 0 and float(b.up.weight.detach().abs().sum()) > 0
               for b in model.text_adapter.values())


def test_cocoop_batched_equals_one_image_at_a_time():
    model = perturb(fp.create("cocoop", tiny_clip(), CLASSNAMES))
    x = images(3)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)
    with pytest.raises(RuntimeError, match="depend on each image"):
        model.text_features()


def test_lamm_label_rows_and_unseen_classes():
    clip = tiny_clip()
    model = perturb(fp.create("lamm", clip, CLASSNAMES))
    assert not model.ctx.requires_grad and model.label_emb.shape == (5, 1, 32)
    assert model.label_start == 5  # [SOS] a photo of a {label} ...
    zs = fp.create("zeroshot", clip, ["zebra", "dog"])
    with torch.no_grad():
        novel = model.classifier(["zebra"]).text_features
        assert torch.allclose(novel, zs.classifier(["zebra"]).text_features, atol=1e-6)
        # class-incremental: adding classes leaves the learned rows of the old ones untouched
        old = model.classifier(CLASSNAMES).text_features
        more = model.classifier(CLASSNAMES + ["zebra"]).text_features
    assert torch.allclose(more[:5], old, atol=1e-6)


def test_lamm_loss_terms():
    model = fp.create("lamm", tiny_clip(), CLASSNAMES, shots=4)
    x, y = images(3), torch.tensor([0, 1, 1])
    # at init the label embeddings equal their originals: parameter and feature terms vanish
    with torch.no_grad():
        img = model.image_features(x)
        logits = model.logits_from(img, model.text_features())
        ce = F.cross_entropy(logits, y)
        kd = 0.05 * 4 * F.cross_entropy(logits / 2, F.softmax(logits / 2, dim=-1))
        assert torch.allclose(model.loss(x, y), ce + kd, atol=1e-5)
        model.label_emb.add_(0.1)
        param = (0.1 ** 2) * model.label_emb.numel() / 4
        t, t0 = model.text_features(), model.initial_text_features()
        logits, fixed = model.logits_from(img, t), model.logits_from(img, t0)
        feat = (1 - F.cosine_similarity(t[y], t0[y], dim=-1)).mean()
        kd = 0.05 * 4 * F.cross_entropy(fixed / 2, F.softmax(logits / 2, dim=-1))
        total = F.cross_entropy(logits, y) + param + feat + kd
        assert torch.allclose(model.loss(x, y), total, rtol=1e-5)


def test_maple_lamm_released_layout_puts_label_over_of():
    clip = tiny_clip()
    paper = fp.create("maple+lamm", clip, CLASSNAMES)
    released = fp.create("maple+lamm", clip, CLASSNAMES, label_layout="of")
    assert paper.label_start == 5 and released.label_start == 3
    # the layout and the parameter-term weight are separate options; released_code sets both
    assert released.config.param_term_weight == paper.config.param_term_weight == 1 / 16
    both = fp.create("maple+lamm", clip, CLASSNAMES, released_code=True, shots=16)
    assert both.label_start == 3 and both.config.param_term_weight == 1.0
    lamm = fp.create("lamm", clip, CLASSNAMES, released_code=True)  # CoOp trainer: over the name
    assert lamm.label_start == lamm.template.name_start and lamm.config.param_term_weight == 1.0
    with pytest.raises(ValueError, match="only for maple\\+lamm"):
        fp.create("coop+lamm", clip, CLASSNAMES, label_layout="of")
    # released code: label starts from (and is pulled toward) the class token, placed over "of";
    # t0 is the plain prompt, so its row 3 is "of"
    assert torch.equal(released.label_emb, paper.label_emb)
    of = paper.backbone.token_embeddings(clip.tokenize(["of"])[0, 1])
    initial = released.text_embeddings(released.template, initial=True)
    assert torch.equal(initial[:, 3], of.expand(5, -1))
    learned = released.text_embeddings(released.template)
    assert torch.equal(learned[:, 3], released.label_emb[:, 0])
    assert torch.equal(learned[:, 5], released.template.embeddings[:, 5])  # class token stays


def test_classifier_over_many_classes_is_chunked_exactly():
    """More classes than one text chunk (256): chunked text features equal the training path."""
    names = [f"thing {i}" for i in range(300)]
    for method, kw in (("coop", {"csc": True}), ("lamm", {}), ("mma", {})):
        model = perturb(fp.create(method, tiny_clip(), names, **kw)).eval()
        x = images(2)
        with torch.no_grad():
            assert torch.allclose(model.classifier()(x), model(x), atol=1e-5, rtol=1e-5), method
    with pytest.raises(ValueError, match="csc=True"):
        fp.create("coop", tiny_clip(), names, csc=True).classifier(["zebra"])
