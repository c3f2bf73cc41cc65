"""KgCoOp against the authors' own code (`shared/parity/kgcoop.*`, recorded from htyao89/KgCoOp
`c43ccc3` KgCoOp/trainers/kgcoop.py in fp32 on the CPU with DATASET.NAME OxfordPets and W 8).

Built as a user builds it (`parity_clip` + `fp.create("kgcoop", ...)`, the teacher prompt being
the one `fastprompt.fit` gives a run on oxford_pets), the official `ctx` copied in, then: eval
logits, the loss and its two terms (`ce`, `kg` = 8 (1 - mean cos)), the teacher (normalised) within
1e-5 of its size, and the gradient of `ctx`. Then the golden run written as the released trainer
saves it (`prompt_learner/model.pth.tar-100`, with the unused `bias_vectors` and `meta_net`) and read
back with `fp.load_original`, the teacher prompt coming from the config's DATASET.NAME.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fastprompt as fp
from golden_common import GRAD_RTOL, LOGIT_ATOL, LOSS_ATOL, golden, rel_grad_gap, require_parity

require_parity()
pytestmark = pytest.mark.golden


def build(clip, **options):
    g, meta = golden("kgcoop")
    c = meta["config"]
    model = fp.create("kgcoop", clip, meta["classnames"], n_ctx=c["N_CTX"], weight=c["W"], **options)
    assert model.config.ctx_init == "a photo of a" and not model.config.csc
    with torch.no_grad():
        model.ctx.copy_(g["param/prompt_learner.ctx"].float())
    assert sum(p.numel() for p in model.trainable_state().values()) == meta["num_trainable"]
    return model, g


def check(model, g, what=""):
    model.eval()
    with torch.no_grad():
        gap = float((model(g["images"].float()) - g["logits"]).abs().max())
    assert gap <= LOGIT_ATOL, f"{what}eval logits differ by {gap:.3g} from the official code"
    model.train()
    terms, _ = model.loss_terms(g["images"].float(), g["labels"])
    for name in ("ce", "kg"):
        got, want = float(terms[name].detach()), float(g[f"loss_terms/{name}"])
        assert abs(got - want) <= LOSS_ATOL, f"{what}{name}: {got:.6f} vs official {want:.6f}"
    loss = model.loss(g["images"].float(), g["labels"])
    loss.backward()
    loss = loss.detach()
    want = float(g["loss"])
    assert abs(float(loss) - want) <= LOSS_ATOL, f"{what}loss {float(loss):.6f} vs official {want:.6f}"
    rel = rel_grad_gap(model.ctx.grad, g["grad/prompt_learner.ctx"])
    assert rel <= GRAD_RTOL, f"{what}ctx gradient: max|Δ|/max|g| = {rel:.3g}"


def test_golden_logits_loss_terms_teacher_and_gradient(parity_clip):
    from fastprompt.methods import METHODS

    _, meta = golden("kgcoop")
    teacher = METHODS["kgcoop"].dataset_options("oxford_pets")["teacher_template"]
    assert teacher == meta["teacher_template"]
    model, g = build(parity_clip, teacher_template=teacher)
    want = g["teacher/text_features"]
    gap = float((model.teacher_features() - want).abs().max())
    assert gap <= 1e-5 * float(want.abs().max()), f"teacher differs by {gap:.3g}"
    check(model, g)


def test_golden_generic_teacher_is_not_the_released_one(parity_clip):
    """The README's measured mistake: "a photo of a {}." as teacher moves kg by -0.122."""
    model, g = build(parity_clip)  # no dataset: the generic prompt
    terms, _ = model.train().loss_terms(g["images"].float(), g["labels"])
    assert float(terms["kg"].detach()) - float(g["loss_terms/kg"]) == pytest.approx(-0.122, abs=2e-3)


@pytest.fixture(scope="module")
def released_dir(parity_clip, tmp_path_factory):
    """`prompt_learner/model.pth.tar-100` as the released KgCoOp trainer saves it (Dassl's
    `save_model` of the registered `prompt_learner`, PREC fp16 as train.py's default): `ctx`, the
    unused `bias_vectors` [1, 512] and `meta_net.linear1` (fp16, TRAINER.COCOOP.PREC's default),
    and the token buffers `token_prefix` (SOS) / `token_suffix` (embedding[:, 1 + 4:])."""
    g, meta = golden("kgcoop")
    emb = parity_clip.model.token_embedding.weight.detach()
    ids = torch.zeros(len(meta["classnames"]), 77, dtype=torch.long)
    for i, row in enumerate(meta["tokenized_prompt_ids"]):
        ids[i, :len(row)] = torch.tensor(row)
    gen = torch.Generator().manual_seed(5)
    sd = {"ctx": g["param/prompt_learner.ctx"].half(),
          "bias_vectors": (torch.randn(1, 512, generator=gen) * 0.02).half(),
          "token_prefix": emb[ids][:, :1].half(), "token_suffix": emb[ids][:, 5:].half(),
          "meta_net.linear1.weight": (torch.randn(512, 512, generator=gen) * 0.04).half(),
          "meta_net.linear1.bias": torch.zeros(512).half()}
    out = tmp_path_factory.mktemp("kgcoop_run")
    (out / "prompt_learner").mkdir()
    torch.save({"state_dict": sd, "epoch": 100, "optimizer": None, "scheduler": None,
                "val_result": None}, out / "prompt_learner" / "model.pth.tar-100")
    return out


def test_golden_released_checkpoint_imports_as_kgcoop(released_dir, parity_clip):
    g, meta = golden("kgcoop")
    c = meta["config"]
    config = {"TRAINER": {"NAME": "KgCoOp", "COOP": {"N_CTX": c["N_CTX"], "CSC": c["CSC"], "W": c["W"],
                                                    "CTX_INIT": c["CTX_INIT"], "PREC": "fp16",
                                                    "CLASS_TOKEN_POSITION": c["CLASS_TOKEN_POSITION"]}},
              "DATASET": {"NAME": c["DATASET.NAME"], "NUM_SHOTS": 16, "SUBSAMPLE_CLASSES": "base"}}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = fp.load_original("kgcoop", released_dir, parity_clip, meta["classnames"], config=config)
    notes = [str(w.message) for w in seen if w.category.__module__.startswith("fastprompt")]
    assert notes == ["checkpoint keys 'bias_vectors', 'meta_net' are created but never used by "
                     "KgCoOp's forward: ignored"], notes
    assert model.config.teacher_template == meta["teacher_template"] and model.config.weight == 8.0
    check(model, g, "imported: ")
    from fastprompt.original import OriginalCheckpointError

    with pytest.raises(OriginalCheckpointError, match="looks like a kgcoop checkpoint"):
        fp.load_original("coop", released_dir, parity_clip, meta["classnames"])
