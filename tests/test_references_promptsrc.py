"""PromptSRC's objective against a reference written from METHODS.md and the released trainer
(muzairkhattak/PromptSRC trainers/promptsrc.py `CustomCLIP.forward`, `forward_backward`), on the
tiny CLIP with open_clip's own blocks (`tests/reference_clip.py`): the teachers from open_clip's
tokenizer and full 77-token text sequences, the KL and L1 terms written out by hand (no
F.kl_div or l1_loss), never through fastprompt's runner, templates or losses."""
import pytest
import torch
import torch.nn.functional as F

import reference_clip as R
from common import CLASSNAMES, images, tiny_clip
from fastprompt.methods.promptsrc import TEACHER_TEMPLATES
from test_references import compare, make


def frozen_text(cm, template: str, names) -> torch.Tensor:
    """Un-normalised text features of the prompt-free CLIP for `template` (names' "_" -> " ")."""
    ids, eot = R.tokens([template.format(n.replace("_", " ")) for n in names])
    with torch.no_grad():
        return R.text_features(cm, cm.token_embedding(ids), eot)


def prompted(model, cm, x):
    """IVLP's features (normalised): text ctx at rows 1..n, deep text prompt i at the input of
    text block i+1; vision prompt 0 appended before ln_pre, prompt i over the last n rows of
    vision block i."""
    emb, _, eot = R.prompts(cm, CLASSNAMES)
    n_deep = len(model.deep_text)
    t = R.text_features(cm, R.put(emb, model.ctx, 1), eot,
                        deep={i + 1: model.deep_text[i] for i in range(n_deep)})
    v = R.image_features(cm, x, model.vision[0], {i: model.vision[i] for i in range(1, n_deep + 1)})
    return F.normalize(t, dim=-1), F.normalize(v, dim=-1)


def promptsrc_reference(model, cm, x, y, terms):
    """CE(z, y) + (KL(p0 || p) summed / (B*C) + 25 mean|t - t0| + 10 mean|v - v0|), with
    t0 = normalise(mean_k frozen(template_k)) over the 60 templates (un-normalised mean),
    v0 = the prompt-free image tower on the same images, z0 = s v0 t0^T."""
    t, v = prompted(model, cm, x)
    s = cm.logit_scale.exp()
    z = s * v @ t.t()
    with torch.no_grad():
        t0 = F.normalize(torch.stack([frozen_text(cm, k, CLASSNAMES) for k in TEACHER_TEMPLATES]).mean(0), dim=-1)
        v0 = F.normalize(R.image_features(cm, x), dim=-1)
        z0 = s * v0 @ t0.t()
    logp, logp0 = torch.log_softmax(z, 1), torch.log_softmax(z0, 1)
    parts = {"ce": F.cross_entropy(z, y),
             "kl": (logp0.exp() * (logp0 - logp)).sum() / (z.shape[0] * z.shape[1]),
             "text_l1": 25 * (t - t0).abs().mean(),
             "image_l1": 10 * (v - v0).abs().mean()}
    terms.update({k: float(p.detach()) for k, p in parts.items()})
    return parts["ce"] + parts["kl"] + parts["text_l1"] + parts["image_l1"], z


@pytest.mark.parametrize("depth", [9, 3])
def test_promptsrc_loss_and_gradients_match_reference(depth):
    model, cm = make("promptsrc", depth=depth, std=0.1), tiny_clip().model
    x, y = images(3, seed=4), torch.tensor([0, 2, 4])
    terms = {}
    compare(model, lambda: promptsrc_reference(model, cm, x, y, terms), x, y)
    ours, _ = model.loss_terms(x, y)
    for name, value in terms.items():  # each term on its own, big enough for a slip to show
        assert float(ours[name].detach()) == pytest.approx(value, rel=1e-5, abs=1e-7), name
        assert value > 1e-3, (name, value)


def test_promptsrc_eval_is_ivlp():
    """At inference PromptSRC is IVLP's path (the teachers play no part)."""
    model, cm = make("promptsrc"), tiny_clip().model
    x = images(2, seed=5)
    with torch.no_grad():
        t, v = prompted(model, cm, x)
        torch.testing.assert_close(model.eval()(x), cm.logit_scale.exp() * v @ t.t(), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(model.classifier()(x), cm.logit_scale.exp() * v @ t.t(), atol=1e-4, rtol=1e-5)


def test_promptsrc_text_teacher_is_the_unnormalised_mean():
    """Normalising each template before the mean gives another t0 (the parity README's
    measured mistake): the reference tells them apart on the tiny CLIP too."""
    model, cm = make("promptsrc"), tiny_clip().model
    each = torch.stack([frozen_text(cm, k, CLASSNAMES) for k in TEACHER_TEMPLATES])
    torch.testing.assert_close(model.teacher_text(), each.mean(0), atol=1e-5, rtol=1e-5)
    wrong = F.normalize(F.normalize(each, dim=-1).mean(0), dim=-1)
    assert (F.normalize(model.teacher_text(), dim=-1) - wrong).abs().max() > 1e-4
