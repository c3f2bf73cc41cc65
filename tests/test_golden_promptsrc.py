"""PromptSRC against the authors' own code (`shared/parity/promptsrc.*`, recorded from
muzairkhattak/PromptSRC `bb95c77` trainers/promptsrc.py in fp32 on the CPU; its README lists the
three fp32 patches and the tolerances used here).

The model is built as a user builds it (`parity_clip` + `fp.create("promptsrc", ...)` with the
JSON config's options), the 18 official tensors copied in by the JSON's layout (typed out below),
and compared: eval logits and both towers' features, the loss and each of its four terms
(`text_l1`, `image_l1`, `kl` within 5e-6: several PromptSRC mistakes move the loss by less than
1e-4, README "How big each mistake is"), both teachers and the teacher logits within 1e-5 of their
size, and all 18 gradients. GPA: the weights of every released setting against
`promptsrc.json["gpa"]` (the code's own numbers), and the tensors a short real training run ends
with against sum_e w_e theta_e computed directly from a snapshot taken after each epoch. Last, the
golden run written as the released trainer saves it (`VLPromptLearner/model.pth.tar-20`, the whole
model in fp16 with the prompt-free `ZS_image_encoder`) and read back with `fp.load_original`.
"""
from __future__ import annotations

import re
import warnings

import pytest
import torch

import fastprompt as fp
from fastprompt.methods.promptsrc import gpa_weights
from fastprompt.recipes import recipe_for
from golden_common import GRAD_RTOL, LOGIT_ATOL, LOSS_ATOL, golden, rel_grad_gap, require_parity

require_parity()
pytestmark = pytest.mark.golden

TERM_ATOL = 5e-6      # text_l1 / image_l1 / kl (the parity README's PromptSRC limits)
TEACHER_RTOL = 1e-5   # teachers: max|Δ| <= 1e-5 * max|value|


def our_name(official: str) -> str:
    """The JSON's layout, typed out: ctx -> ctx; image_encoder.VPT -> vision.0 (appended at the
    input of ln_pre); image_encoder.transformer.resblocks.i.VPT_shallow -> vision.i (last 4 rows at
    vision block i); text_encoder.transformer.resblocks.i.VPT_shallow -> deep_text.(i-1) (rows 1..4
    at text block i)."""
    if official == "prompt_learner.ctx":
        return "ctx"
    if official == "image_encoder.VPT":
        return "vision.0"
    m = re.fullmatch(r"(image|text)_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow", official)
    assert m, official
    return f"vision.{m.group(2)}" if m.group(1) == "image" else f"deep_text.{int(m.group(2)) - 1}"


def options(config: dict) -> dict:
    assert config["N_CTX_TEXT"] == config["N_CTX_VISION"]
    assert config["PROMPT_DEPTH_TEXT"] == config["PROMPT_DEPTH_VISION"]
    return {"n_ctx": config["N_CTX_TEXT"], "depth": config["PROMPT_DEPTH_TEXT"],
            "ctx_init": config["CTX_INIT"], "text_weight": config["TEXT_LOSS_WEIGHT"],
            "image_weight": config["IMAGE_LOSS_WEIGHT"], "gpa_mean": config["GPA_MEAN"],
            "gpa_std": config["GPA_STD"]}


def build(clip):
    g, meta = golden("promptsrc")
    model = fp.create("promptsrc", clip, meta["classnames"], **options(meta["config"]))
    ours = model.trainable_state()
    official = {k[len("param/"):]: v for k, v in g.items() if k.startswith("param/")}
    mapped = {our_name(k): k for k in official}
    assert sorted(mapped) == sorted(ours), f"trainable tensors differ: {sorted(ours)} vs {sorted(mapped)}"
    assert sum(p.numel() for p in ours.values()) == meta["num_trainable"] == 46080
    with torch.no_grad():
        for mine, theirs in mapped.items():
            ours[mine].copy_(official[theirs].float())
    return model, g, mapped


def close(got, want, rtol, what):
    gap, size = float((got - want).abs().max()), float(want.abs().max())
    assert gap <= rtol * size, f"{what}: max|Δ| {gap:.3g}, max|value| {size:.3g}"


def check_eval(model, g):
    model.eval()
    image, text = [], []
    bb = model.backbone
    encode, head = bb.encode_image, bb.text_head
    bb.encode_image = lambda *a, **k: image.append(encode(*a, **k)) or image[-1]
    bb.text_head = lambda *a, **k: text.append(head(*a, **k)) or text[-1]
    try:
        with torch.no_grad():
            logits = model(g["images"].float())
    finally:
        del bb.encode_image, bb.text_head
    gap = float((logits - g["logits"]).abs().max())
    assert gap <= LOGIT_ATOL, f"eval logits differ by {gap:.3g} from the official code"
    close(image[0], g["eval/image_features"], 1e-4, "prompted image features")
    close(text[0], g["eval/text_features"], 1e-4, "prompted text features")


def check_training(model, g, mapped, what=""):
    model.train()
    terms, _ = model.loss_terms(g["images"].float(), g["labels"])
    for name in ("text_l1", "image_l1", "kl"):
        got, want = float(terms[name].detach()), float(g[f"loss_terms/{name}"])
        assert abs(got - want) <= TERM_ATOL, f"{what}{name}: {got:.8f} vs official {want:.8f}"
    assert float((terms["ce"].detach() - g["loss_terms/ce"]).abs()) <= LOSS_ATOL
    model.zero_grad()
    loss = model.loss(g["images"].float(), g["labels"])
    loss.backward()
    gap = float((loss.detach() - g["loss"]).abs())
    assert gap <= LOSS_ATOL, f"{what}loss {float(loss):.6f} vs official {float(g['loss']):.6f}"
    ours = model.trainable_state()
    bad = [f"{k} ({mapped[k]}): {rel_grad_gap(ours[k].grad, g[f'grad/{mapped[k]}']):.3g}"
           for k in ours if rel_grad_gap(ours[k].grad, g[f"grad/{mapped[k]}"]) > GRAD_RTOL]
    assert len(ours) == 18 and not bad, f"{what}gradients differ (max|Δ|/max|g|): " + "; ".join(bad)


def test_golden_eval_logits_and_features(parity_clip):
    model, g, _ = build(parity_clip)
    check_eval(model, g)


def test_golden_loss_each_term_and_every_gradient(parity_clip):
    model, g, mapped = build(parity_clip)
    check_training(model, g, mapped)


def test_golden_teachers(parity_clip):
    """t0 = the mean of the 60 templates' UN-normalised frozen text features (README: normalising
    each first moves text_l1 by 1.5e-4 only, hence this direct check); v0 = the prompt-free image
    tower on the same batch; z0 = 100 v0 t0^T."""
    from fastprompt.methods.promptsrc import TEACHER_TEMPLATES

    model, g, _ = build(parity_clip)
    _, meta = golden("promptsrc")
    assert list(TEACHER_TEMPLATES) == meta["teacher_templates"]
    close(model.teacher_text(), g["teacher/text_features"], TEACHER_RTOL, "teacher text (unnormalised mean)")
    with torch.no_grad():
        v0 = model.teacher_image(g["images"].float())
        z0 = model.logits_from(torch.nn.functional.normalize(v0, dim=-1),
                               torch.nn.functional.normalize(model.teacher_text(), dim=-1))
    close(v0, g["teacher/image_features"], TEACHER_RTOL, "teacher image features")
    close(z0, g["teacher/logits"], TEACHER_RTOL, "teacher logits")


# ------------------------------------------------------------------------------------ GPA
@pytest.mark.parametrize("setting, dataset, protocol", [
    ("b2n (MAX_EPOCH 20, GPA_MEAN 15, GPA_STD 1; read from the built trainer)", "dtd", "base2novel"),
    ("cross_dataset_dg (MAX_EPOCH 20, GPA_MEAN 6, GPA_STD 10; code's get_gauss + build_model's two lines)",
     "imagenet", "cross"),
    ("few_shot_groupA (MAX_EPOCH 50, 30, 30)", "caltech101", "fewshot"),
    ("few_shot_groupB (MAX_EPOCH 50, 45, 5; commented alternative in the few-shot yaml)", "eurosat", "fewshot"),
])
def test_golden_gpa_weights_of_every_recipe(setting, dataset, protocol):
    """Each released setting as fastprompt's recipe gives it (epochs and the GPA options of the
    protocol, per dataset for few-shot) against the weights the official code computes."""
    _, meta = golden("promptsrc")
    want = meta["gpa"][setting]
    r = recipe_for("promptsrc", dataset, protocol)
    config = fp.create("promptsrc", fp.load_clip("tiny", seed=0), ["a", "b"], **r.options).config
    got = gpa_weights(config.gpa_mean, config.gpa_std, r.epochs)
    assert len(got) == len(want) == r.epochs
    assert got == pytest.approx(want, rel=1e-13, abs=0), setting


def test_golden_gpa_average_of_a_real_run(tmp_path):
    """20 epochs of the base-to-novel recipe on a tiny problem, a snapshot of every learnable tensor
    taken after each epoch's last step: the saved model is sum_e w_e theta_e with the official
    weights (b2n), computed here directly in float64; and it is not the last epoch's tensors."""
    from fastprompt.training import TrainEnv, train
    from test_training_recipes import items

    _, meta = golden("promptsrc")
    w = meta["gpa"]["b2n (MAX_EPOCH 20, GPA_MEAN 15, GPA_STD 1; read from the built trainer)"]
    torch.manual_seed(0)
    model = fp.create("promptsrc", fp.load_clip("tiny", seed=0), ["dog", "cat"], depth=3)
    snapshots, end_epoch = [], model.end_epoch

    def recording(epoch, epochs):
        snapshots.append({k: p.detach().clone() for k, p in model.trainable_state().items()})
        end_epoch(epoch, epochs)
    model.end_epoch = recording
    recipe = recipe_for("promptsrc", "dtd", "base2novel", lr=0.05)
    train(model, recipe, items(8), tmp_path, TrainEnv(device=torch.device("cpu"), seed=1, progress=False),
          log=lambda *_: None)
    assert len(snapshots) == 20
    saved = fp.load(tmp_path, clip=model.clip).trainable_state()
    for name, p in model.trainable_state().items():
        direct = sum(w[e] * snapshots[e][name].double() for e in range(20))
        assert torch.allclose(p.detach().double(), direct, atol=1e-7, rtol=1e-6), name
        assert torch.equal(saved[name], p.detach()), name
        assert (p.detach() - snapshots[-1][name]).abs().max() > 1e-4, f"{name}: GPA changed nothing"


# ------------------------------------------------------------ the released checkpoint format
@pytest.fixture(scope="module")
def released_dir(parity_clip, tmp_path_factory):
    """An output directory as the released trainer leaves it after 20 epochs: Dassl's
    `save_model` writes `VLPromptLearner/model.pth.tar-20` = {"state_dict", "epoch", "optimizer",
    "scheduler", "val_result"}, the state dict being the whole CustomCLIP's (`register_model(
    "VLPromptLearner", self.model, ...)`), in the released recipe's fp16 (PREC fp16; the prompts of
    the CLIP blocks `VPT`/`VPT_shallow` stay fp32 parameters): `prompt_learner.ctx`, its buffers
    `token_prefix` (SOS) and `token_suffix` (embedding[:, 1 + n_ctx:]), the prompt-free copy of the
    image tower `prompt_learner.ZS_image_encoder.*`, `image_encoder.*` (CLIP's visual with the
    vision prompts), `text_encoder.*` (TextEncoder: transformer with the deep text prompts,
    positional_embedding, ln_final, text_projection) and `logit_scale`. Written from the golden
    tensors under their official names and the parity backbone's weights, not by fastprompt."""
    g, meta = golden("promptsrc")
    clip_sd = parity_clip.model.state_dict()
    param = {k[len("param/"):]: v.float() for k, v in g.items() if k.startswith("param/")}
    ids = torch.zeros(len(meta["classnames"]), 77, dtype=torch.long)
    for i, row in enumerate(meta["tokenized_prompt_ids"]):
        ids[i, :len(row)] = torch.tensor(row)
    embedding = clip_sd["token_embedding.weight"][ids]
    sd = {"prompt_learner.ctx": param["prompt_learner.ctx"].half(),
          "prompt_learner.token_prefix": embedding[:, :1].half(),
          "prompt_learner.token_suffix": embedding[:, 1 + 4:].half()}
    for k, v in clip_sd.items():
        if k.startswith("visual."):
            sd["prompt_learner.ZS_image_encoder." + k[len("visual."):]] = v.half()
    for k, v in clip_sd.items():
        if k.startswith("visual."):
            sd["image_encoder." + k[len("visual."):]] = v.half()
        elif k.startswith(("transformer.", "positional_embedding", "ln_final.", "text_projection")):
            sd["text_encoder." + k] = v.half()
    sd["logit_scale"] = clip_sd["logit_scale"].half()
    sd.update({k: v.clone() for k, v in param.items() if "VPT" in k})  # fp32 parameters
    assert sorted(k for k in sd if k in param) == sorted(param)
    out = tmp_path_factory.mktemp("promptsrc_run")
    (out / "VLPromptLearner").mkdir()
    file = out / "VLPromptLearner" / "model.pth.tar-20"
    sgd = torch.optim.SGD([torch.nn.Parameter(param["prompt_learner.ctx"])], lr=0.0025, momentum=0.9)
    torch.save({"state_dict": sd, "epoch": 20, "optimizer": sgd.state_dict(),
                "scheduler": {"last_epoch": 20, "base_lrs": [0.0025]}, "val_result": None}, file)
    del sd
    yield out
    file.unlink()  # ~470 MB


def test_golden_released_checkpoint_imports_as_promptsrc(released_dir, parity_clip):
    g, meta = golden("promptsrc")
    c = meta["config"]
    section = {k: c[k] for k in ("N_CTX_TEXT", "N_CTX_VISION", "CTX_INIT", "PROMPT_DEPTH_TEXT",
                                 "PROMPT_DEPTH_VISION", "TEXT_LOSS_WEIGHT", "IMAGE_LOSS_WEIGHT",
                                 "GPA_MEAN", "GPA_STD")}
    config = {"TRAINER": {"NAME": "PromptSRC", "PROMPTSRC": {**section, "PREC": "fp16"}},
              "MODEL": {"BACKBONE": {"NAME": c["backbone"]}}, "OPTIM": {"MAX_EPOCH": 20}}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = fp.load_original("promptsrc", released_dir, parity_clip, meta["classnames"], config=config)
    ours = [str(w.message) for w in seen if w.category.__module__.startswith("fastprompt")]
    assert not ours, f"importing the released PromptSRC checkpoint warned: {ours}"
    assert model.name == "promptsrc" and model.config.depth == 9 and model.config.n_ctx == 4
    mapped = {our_name(k[len("param/"):]): k[len("param/"):] for k in g if k.startswith("param/")}
    check_eval(model, g)
    check_training(model, g, mapped, "imported: ")
    from fastprompt.original import OriginalCheckpointError

    with pytest.raises(OriginalCheckpointError, match="looks like a promptsrc checkpoint"):
        fp.load_original("ivlp", released_dir, parity_clip, meta["classnames"])
