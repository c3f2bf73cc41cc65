"""KgCoOp's objective against a reference written from METHODS.md and the released trainer
(htyao89/KgCoOp KgCoOp/trainers/kgcoop.py `CustomCLIP.forward`, `forward_backward`), on the tiny
CLIP with open_clip's own blocks (`tests/reference_clip.py`): the teacher from open_clip's
tokenizer and the full 77-token sequence, the cosine term written out (no cosine_similarity)."""
import pytest
import torch
import torch.nn.functional as F

import reference_clip as R
from common import CLASSNAMES, images, tiny_clip
from test_references import compare, make
from test_references_promptsrc import frozen_text


@pytest.mark.parametrize("teacher, weight", [("a photo of a {}, a type of pet.", 8.0),
                                             ("{} texture.", 2.5)])
def test_kgcoop_loss_and_gradients_match_reference(teacher, weight):
    """CE(z, y) + W (1 - mean_c t_c . th_c), th = normalise(frozen(teacher prompt))."""
    model = make("kgcoop", teacher_template=teacher, weight=weight, std=0.1)
    cm = tiny_clip().model
    x, y = images(3, seed=6), torch.tensor([1, 2, 3])
    emb, _, eot = R.prompts(cm, CLASSNAMES)
    kg = []

    def reference():
        t = F.normalize(R.text_features(cm, R.put(emb, model.ctx, 1), eot), dim=-1)
        th = F.normalize(frozen_text(cm, teacher, CLASSNAMES), dim=-1)
        z = R.logits(cm, R.image_features(cm, x), t)
        term = weight * (1 - (t * th).sum(-1).mean())
        kg.append(float(term.detach()))
        return F.cross_entropy(z, y) + term, z
    compare(model, reference, x, y)
    assert kg[0] > 1e-3
    ours, _ = model.loss_terms(x, y)
    assert float(ours["kg"].detach()) == pytest.approx(kg[0], rel=1e-5)
