"""The released checkpoints of PromptSRC and KgCoOp through `fp.load_original` and the convert CLI
(tiny CLIP; the ViT-B/16 files of the golden runs are in test_golden_promptsrc/_kgcoop.py).

Files are written here with torch.save in each release's layout, keys typed out from the released
sources (not from fastprompt.original): PromptSRC (muzairkhattak/PromptSRC trainers/promptsrc.py)
registers the whole CustomCLIP as `VLPromptLearner` — IVLP's names plus the prompt-free copy of the
image tower `prompt_learner.ZS_image_encoder.*`; an IVLP file (multimodal-prompt-learning
trainers/independentVL.py) has the same names without it and must still import as IVLP. KgCoOp
(htyao89/KgCoOp KgCoOp/trainers/kgcoop.py) registers its `prompt_learner`: CoOp's `ctx` and token
buffers plus the unused `bias_vectors` and `meta_net.linear1`.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fastprompt as fp
from fastprompt.convert import main as convert_main
from fastprompt.original import OriginalCheckpointError, load_original, save_original
from test_original import write

from common import CLASSNAMES, images, tiny_clip


def moved(method, seed=0, **options):
    """A model whose learnable tensors hold fp16-representable values away from their init."""
    torch.manual_seed(seed)
    model = fp.create(method, tiny_clip(), CLASSNAMES, **options).eval()
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for p in model.trainable_state().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05).copy_(p.half().float())
    return model


def vl_file(m, zs: bool) -> dict:
    """The whole-model state dict of IVLP's (zs=False) or PromptSRC's (zs=True) trainer, fp16 as
    PREC fp16 saves it (the VPT parameters stay fp32); a few CLIP keys stand for all of them."""
    c, d = len(m.classnames), m.backbone.text_width
    visual = m.clip.model.visual
    sd = {"prompt_learner.ctx": m.ctx.half(), "prompt_learner.token_prefix": torch.randn(c, 1, d).half(),
          "prompt_learner.token_suffix": torch.randn(c, 72, d).half(), "image_encoder.VPT": m.vision[0],
          "image_encoder.class_embedding": visual.class_embedding.half(),
          "image_encoder.conv1.weight": visual.conv1.weight.half(),
          "text_encoder.positional_embedding": m.clip.model.positional_embedding.half(),
          "logit_scale": m.clip.model.logit_scale.half()}
    for i in range(1, len(m.vision)):
        sd[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = m.vision[i]
        sd[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = m.deep_text[i - 1]
    if zs:
        sd.update({"prompt_learner.ZS_image_encoder.class_embedding": visual.class_embedding.half(),
                   "prompt_learner.ZS_image_encoder.conv1.weight": visual.conv1.weight.half(),
                   "prompt_learner.ZS_image_encoder.ln_post.weight": visual.ln_post.weight.half()})
    return {k: v.detach().clone() for k, v in sd.items()}


def kg_file(m, d=None) -> dict:
    c, d = len(m.classnames), d or m.backbone.text_width
    g = torch.Generator().manual_seed(3)
    return {"ctx": m.ctx.detach().half(), "bias_vectors": (torch.randn(1, 512, generator=g) * 0.02).half(),
            "meta_net.linear1.weight": (torch.randn(512, 512, generator=g) * 0.02).half(),
            "meta_net.linear1.bias": torch.zeros(512).half(),
            "token_prefix": torch.randn(c, 1, d).half(), "token_suffix": torch.randn(c, 72, d).half()}


def quiet_load(method, path, config=None, names=CLASSNAMES):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = load_original(method, path, tiny_clip(), names, config=config).eval()
    return model, [str(w.message) for w in seen if w.category.__module__.startswith("fastprompt")]


def same_model(a, b):
    x, y = images(3), torch.tensor([0, 2, 4])
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), atol=1e-5, rtol=1e-5)
    la, lb = a.train().loss(x, y), b.train().loss(x, y)
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ PromptSRC
def test_promptsrc_and_ivlp_files_are_told_apart(tmp_path):
    src = moved("promptsrc", depth=4)
    psrc = write(tmp_path / "VLPromptLearner" / "model.pth.tar-20", vl_file(src, zs=True))
    ivlp = write(tmp_path / "ivlp" / "VLPromptLearner" / "model.pth.tar-5", vl_file(src, zs=False))
    config = {"TRAINER": {"NAME": "PromptSRC", "PROMPTSRC": {
        "N_CTX_TEXT": 4, "N_CTX_VISION": 4, "PROMPT_DEPTH_TEXT": 4, "PROMPT_DEPTH_VISION": 4,
        "CTX_INIT": "a photo of a", "PREC": "fp16", "TEXT_LOSS_WEIGHT": 25, "IMAGE_LOSS_WEIGHT": 10,
        "GPA_MEAN": 6, "GPA_STD": 10}}}
    model, notes = quiet_load("promptsrc", tmp_path, config)
    assert not notes and model.name == "promptsrc" and model.config.depth == 4
    assert (model.config.gpa_mean, model.config.gpa_std) == (6.0, 10.0)
    same_model(model, src)
    # the same prompts without the ZS tower: IVLP's file, imported as IVLP (same eval path)
    as_ivlp, notes = quiet_load("ivlp", tmp_path / "ivlp")
    assert not notes and as_ivlp.name == "ivlp" and as_ivlp.config.n_ctx == 4
    with torch.no_grad():
        torch.testing.assert_close(as_ivlp(images(2)), src.eval()(images(2)), atol=1e-5, rtol=1e-5)
    with pytest.raises(OriginalCheckpointError, match="looks like a promptsrc checkpoint .* not IVLP"):
        load_original("ivlp", psrc, tiny_clip(), CLASSNAMES)
    with pytest.raises(OriginalCheckpointError, match="looks like a ivlp checkpoint .* not PromptSRC"):
        load_original("promptsrc", ivlp, tiny_clip(), CLASSNAMES)


def test_promptsrc_config_is_cross_checked(tmp_path):
    src = moved("promptsrc", depth=3)
    path = write(tmp_path / "model.pth.tar-20", vl_file(src, zs=True))
    with pytest.raises(OriginalCheckpointError, match="PROMPT_DEPTH_TEXT=3, the config says 9"):
        load_original("promptsrc", path, tiny_clip(), CLASSNAMES, config={"PROMPT_DEPTH_TEXT": 9})
    with pytest.raises(OriginalCheckpointError, match="TRAINER.NAME is 'IVLP', not the PromptSRC trainer"):
        load_original("promptsrc", path, tiny_clip(), CLASSNAMES, config={"TRAINER": {"NAME": "IVLP"}})


@pytest.mark.parametrize("method, options", [("promptsrc", {"depth": 3}), ("kgcoop", {}),
                                             ("kgcoop", {"ctx_init": "", "n_ctx": 3, "csc": True})])
def test_save_original_round_trips_and_is_detected(method, options, tmp_path):
    src = moved(method, **options)
    path = save_original(src, tmp_path, epoch=3)
    model, _ = quiet_load(method, path)
    same_model(model, src)


# ------------------------------------------------------------------------------------ KgCoOp
def test_kgcoop_release_file_imports_with_a_note(tmp_path):
    src = moved("kgcoop", teacher_template="a photo of a {}, a type of texture.")
    root = tmp_path / "out"
    write(root / "prompt_learner" / "model.pth.tar-100", kg_file(src))
    config = {"TRAINER": {"NAME": "KgCoOp", "COOP": {"N_CTX": 4, "CSC": False, "W": 8.0, "CTX_INIT": True,
                                                    "CLASS_TOKEN_POSITION": "end"}},
              "DATASET": {"NAME": "DescribableTextures"}}
    model, notes = quiet_load("kgcoop", root, config)
    assert notes == ["checkpoint keys 'bias_vectors', 'meta_net' are created but never used by KgCoOp's "
                     "forward: ignored"]
    assert model.config.teacher_template == "a photo of a {}, a type of texture."  # not CoOp's "{} texture."
    assert model.config.ctx_init == "a photo of a" and model.config.weight == 8.0
    same_model(model, src)
    with pytest.raises(OriginalCheckpointError, match="looks like a kgcoop checkpoint.*not CoOp"):
        load_original("coop", root, tiny_clip(), CLASSNAMES)
    with pytest.raises(OriginalCheckpointError, match="looks like a kgcoop checkpoint.*not CoCoOp"):
        load_original("cocoop", root, tiny_clip(), CLASSNAMES)


def test_kgcoop_ctx_init_is_a_switch(tmp_path):
    """Any true CTX_INIT is the hard-coded 'a photo of a' (4 vectors); false: N_CTX from N(0, 0.02)."""
    random16 = moved("kgcoop", ctx_init="", n_ctx=6, weight=2.0)
    path = write(tmp_path / "r" / "model.pth.tar-1", kg_file(random16))
    model, _ = quiet_load("kgcoop", path, {"CTX_INIT": False, "N_CTX": 6, "W": 2.0})
    assert (model.config.n_ctx, model.config.ctx_init, model.config.prompt) == (6, "", "X X X X X X")
    same_model(model, random16)
    with pytest.raises(OriginalCheckpointError, match=r"shape \(6, 32\), but CTX_INIT makes KgCoOp's context"):
        load_original("kgcoop", path, tiny_clip(), CLASSNAMES, config={"CTX_INIT": "a photo of a"})
    csc = moved("kgcoop", ctx_init="", n_ctx=3, csc=True)
    path = write(tmp_path / "c" / "model.pth.tar-1", kg_file(csc))
    model, _ = quiet_load("kgcoop", path, {"CTX_INIT": "False", "CSC": True})
    assert model.config.csc and model.config.n_ctx == 3
    same_model(model, csc)
    bare = {k: v for k, v in kg_file(csc).items() if not k.startswith("token_")}
    with pytest.raises(OriginalCheckpointError, match="5 class-specific contexts but 4"):
        load_original("kgcoop", write(tmp_path / "b" / "model.pth.tar-1", bare), tiny_clip(), CLASSNAMES[:4],
                      config={"CTX_INIT": False})
    with pytest.raises(OriginalCheckpointError, match="DATASET.NAME='Birds' has no prompt in KgCoOp's table"):
        load_original("kgcoop", path, tiny_clip(), CLASSNAMES, config={"DATASET": {"NAME": "Birds"}})


def test_convert_cli_reads_both_releases(tmp_path, capsys):
    names = tmp_path / "classnames.txt"
    names.write_text("\n".join(CLASSNAMES) + "\n")
    for method, sd, registered in (("promptsrc", vl_file(moved("promptsrc", depth=2), zs=True), "VLPromptLearner"),
                                   ("kgcoop", kg_file(moved("kgcoop")), "prompt_learner")):
        root = tmp_path / method
        write(root / registered / "model.pth.tar-7", sd)
        out = tmp_path / f"run-{method}"
        assert convert_main(["--original", method, str(root), "--model", "tiny", "--pretrained", "none",
                             "--classnames", str(names), "--out", str(out)]) == 0
        assert fp.load(out).name == method
    assert "never used by KgCoOp's forward" in capsys.readouterr().err
