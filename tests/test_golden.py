"""Golden parity: every method against the outputs of the authors' own code (`pytest -m golden`).

The data are in `shared/parity/` (see its README): seven official runs on one fixed random
ViT-B/16, each with the trained tensors set to known values, the eval logits, the training loss and
the gradient of every trainable tensor for one fixed batch. Here each method is built the way a
user builds it (`fp.load_clip("ViT-B-16", pretrained=<OpenAI-layout .pt>, quick_gelu=True)`, then
`fp.create` with the options of the run's config), the official tensors are copied in by the
correspondence the JSON describes (typed out below, not taken from `fastprompt.original`), and everything is compared
at the README's tolerances: logits and loss atol 1e-4, per tensor max|Δgrad| <= 1e-3 * max|grad|.
The last tests take the other road a user takes: the golden MaPLe+LAMM run written as the released
LAMM trainer saves it (Dassl's `MultiModalPromptLearner/model.pth.tar-5`) and read back with
`fp.load_original`, the parameter-term weight 1/shots coming from the config's `shots`.

The folder, the tolerances and the parity backbone are in `golden_common.py` (shared with the
golden modules of the later methods). Without the folder (a user's clone) the module is skipped,
saying so; with `CI` set it fails instead.
"""
from __future__ import annotations

import re
import warnings

import pytest
import torch

import fastprompt as fp
from golden_common import (FEATURE_ATOL, GRAD_RTOL, LOGIT_ATOL, LOSS_ATOL, golden, rel_grad_gap,
                           require_parity)

require_parity()
pytestmark = pytest.mark.golden

#: golden file -> our method name
METHOD = {"coop": "coop", "cocoop": "cocoop", "maple": "maple", "mma": "mma", "lamm": "lamm",
          "lamm_coop": "coop+lamm", "lamm_maple": "maple+lamm"}


@pytest.fixture(scope="module")
def clip(parity_clip):
    return parity_clip


def options(name: str, config: dict) -> dict:
    """fp.create keyword options from the official run's config."""
    opts = {}
    if "N_CTX" in config:
        opts.update(n_ctx=config["N_CTX"], ctx_init=config["CTX_INIT"])
    if config.get("CSC"):
        opts["csc"] = True
    if "PROMPT_DEPTH" in config:
        opts["depth"] = config["PROMPT_DEPTH"]
    if "ADAPTER_SCALE" in config:
        opts.update(start=config["ADAPTER_START"], end=config["ADAPTER_END"], width=config["ADAPTER_DIM"],
                    text_scale=config["ADAPTER_SCALE"], vision_scale=config["ADAPTER_SCALE"])
    if "shots" in config:
        opts["shots"] = config["shots"]
    if name == "lamm_maple":  # the released MaPLe+LAMM: label over the word "of", weight 1/shots
        opts["label_layout"] = "of"
    return opts


def our_name(official: str) -> str:
    """Our parameter name for an official one (the JSON's descriptions, typed out):
    prompt_learner.ctx -> ctx; token_classes -> label_emb; compound_prompts_text.i -> deep_text.i;
    compound_prompt_projections.i -> deep_proj.i; MMA's `down.0` (Linear in a Sequential) -> down;
    shared_adapter.k.0 -> shared_adapter.k."""
    n = re.sub(r"^(prompt_learner|adapter_learner)\.", "", official)
    n = n.replace("token_classes", "label_emb")
    n = n.replace("compound_prompts_text.", "deep_text.").replace("compound_prompt_projections.", "deep_proj.")
    n = re.sub(r"^(text|visual)_adapter\.(\d+)\.down\.0\.", r"\1_adapter.\2.down.", n)
    return re.sub(r"^shared_adapter\.(\d+)\.0\.", r"shared_adapter.\1.", n)


def build(name: str, clip):
    """Our model for golden run `name`, holding the golden values of every trainable tensor."""
    g, meta = golden(name)
    model = fp.create(METHOD[name], clip, meta["classnames"], **options(name, meta["config"]))
    ours = model.trainable_state()
    official = {k[len("param/"):]: v for k, v in g.items() if k.startswith("param/")}
    mapped = {our_name(k): k for k in official}
    assert sorted(mapped) == sorted(ours), f"trainable tensors differ: ours {sorted(ours)} vs {sorted(mapped)}"
    assert sum(p.numel() for p in ours.values()) == meta["num_trainable"]
    with torch.no_grad():
        for mine, theirs in mapped.items():
            assert ours[mine].shape == official[theirs].shape, (mine, theirs)
            ours[mine].copy_(official[theirs].float())
    return model, g, mapped


def record_features(model) -> dict:
    """Wrap the backbone's image encoder and text head to keep what they return (diagnostics)."""
    seen = {"image": [], "text": []}
    bb = model.backbone
    image, head = bb.encode_image, bb.text_head

    def encode_image(*a, **kw):
        out = image(*a, **kw)
        seen["image"].append(out.detach())
        return out

    def text_head(*a, **kw):
        out = head(*a, **kw)
        seen["text"].append(out.detach())
        return out
    bb.encode_image, bb.text_head = encode_image, text_head
    return seen


def feature_gap(seen: list, expected: torch.Tensor) -> float:
    got = torch.cat(seen) if seen else torch.empty(0)
    if got.numel() != expected.numel():
        return float("nan")
    return float((got.reshape(expected.shape) - expected).abs().max())


METHODS = list(METHOD)


@pytest.mark.parametrize("name", METHODS)
def test_golden_eval_logits(name, clip):
    model, g, _ = build(name, clip)
    model.eval()
    seen = record_features(model)
    with torch.no_grad():
        logits = model(g["images"].float())
    gap = float((logits - g["logits"]).abs().max())
    img = feature_gap(seen["image"], g["eval/image_features"])
    txt = feature_gap(seen["text"], g["eval/text_features"])
    where = (f"max|Δ| image features {img:.3g}, text features {txt:.3g} (before normalisation; "
             f"the tower over {FEATURE_ATOL:g} is the one that differs)")
    assert gap <= LOGIT_ATOL, f"{name}: eval logits differ by {gap:.3g} from the official code; {where}"
    assert img <= FEATURE_ATOL and txt <= FEATURE_ATOL, f"{name}: {where}"


def expected_grads(g: dict, mapped: dict) -> dict:
    """{our name: official grad}; the coupling weights without a stored grad (lamm_maple) are
    rebuilt from d loss / d output: grad W = gradout.T @ input (README, keys list step 3)."""
    out = {mine: g[f"grad/{theirs}"] for mine, theirs in mapped.items() if f"grad/{theirs}" in g}
    for key in (k for k in g if k.startswith("gradout/")):
        linear = key[len("gradout/"):]
        mine = our_name(f"{linear}.weight")
        if mine in out:
            continue
        source = ("prompt_learner.ctx" if linear.endswith(".proj")
                  else linear.replace("compound_prompt_projections", "compound_prompts_text"))
        out[mine] = g[key].t() @ g[f"param/{source}"].float()
    return out


@pytest.mark.parametrize("name", METHODS)
def test_golden_training_loss_and_grads(name, clip):
    model, g, mapped = build(name, clip)
    model.train()
    loss = model.loss(g["images"].float(), g["labels"])
    loss.backward()
    hint = ""
    if "loss_terms/param_sum_sq" in g:
        hint = (f" (LAMM terms of the official run: ce {float(g['loss_terms/ce']):.6f}, param_sum_sq "
                f"{float(g['loss_terms/param_sum_sq']):.6f} weighted 1/16, feature "
                f"{float(g['loss_terms/feature']):.6f}, logit_distill {float(g['loss_terms/logit_distill']):.6f})")
    gap = float((loss.detach() - g["loss"]).abs())
    assert gap <= LOSS_ATOL, f"{name}: loss {float(loss.detach()):.6f} vs official {float(g['loss']):.6f}{hint}"
    want = expected_grads(g, mapped)
    ours = model.trainable_state()
    assert sorted(want) == sorted(ours), "every trainable tensor needs a golden gradient"
    bad = []
    for k, ref in want.items():
        got = ours[k].grad
        assert got is not None, f"{name}: no gradient reached {k}"
        rel = rel_grad_gap(got, ref)
        if rel > GRAD_RTOL:
            bad.append(f"{k} ({mapped[k]}): max|Δ|/max|g| = {rel:.3g}")
    assert not bad, f"{name}: gradients differ from the official code: " + "; ".join(bad)


# ------------------------------------------------ the released MaPLe+LAMM checkpoint through the importer
def _lamm_maple_state_dict(clip) -> dict:
    """The state dict LAMM's MaPLe trainer saves (gaojingsheng/LAMM `d4e7d02` trainers/maple.py:
    `register_model("MultiModalPromptLearner", self.model, ...)`, i.e. the whole CustomCLIP, fp32 as
    PREC fp32 runs it), written here from the golden tensors under their original names, not by
    fastprompt's exporter: `logit_scale`; the prompt learner's parameters (`ctx`, `token_classes`,
    its frozen twin `fix_token`, `proj`, `compound_prompts_text.i`, `compound_prompt_projections.i`)
    and buffers (`token_prefix` = SOS, `token_suffix` = embedding[:, 2+n_ctx:], `token_suffix_test`
    = embedding[:, 1+n_ctx:] of "a photo of a {class}." with SUBSAMPLE_CLASSES all); the CLIP as
    `image_encoder.*` (clip_model.visual) and `text_encoder.*` (MaPLe's TextEncoder: transformer,
    positional_embedding, ln_final, text_projection; no token embedding). The CLIP values are the
    parity backbone's (OpenAI names, as open_clip keeps them)."""
    g, meta = golden("lamm_maple")
    n_ctx, sd = meta["config"]["N_CTX"], {}
    clip_sd = clip.model.state_dict()
    sd["logit_scale"] = clip_sd["logit_scale"].clone()
    param = {k[len("param/"):]: v.float() for k, v in g.items() if k.startswith("param/")}
    ids = torch.zeros(len(meta["classnames"]), 77, dtype=torch.long)
    for i, row in enumerate(meta["tokenized_prompt_ids"]):
        ids[i, :len(row)] = torch.tensor(row)
    embedding = clip_sd["token_embedding.weight"][ids]
    learner = {"ctx": param["prompt_learner.ctx"], "token_classes": param["prompt_learner.token_classes"],
               "fix_token": g["buffer/prompt_learner.fix_token"].float(),
               "token_prefix": embedding[:, :1], "token_suffix": embedding[:, 2 + n_ctx:],
               "token_suffix_test": embedding[:, 1 + n_ctx:]}
    learner.update({k[len("prompt_learner."):]: v for k, v in param.items()
                    if k.startswith(("prompt_learner.proj.", "prompt_learner.compound_"))})
    sd.update({f"prompt_learner.{k}": v.clone() for k, v in learner.items()})
    assert sorted(k for k in sd if k in param) == sorted(param), "every golden tensor goes in the file"
    for k, v in clip_sd.items():
        if k.startswith("visual."):
            sd["image_encoder." + k[len("visual."):]] = v.clone()
        elif k.startswith(("transformer.", "positional_embedding", "ln_final.", "text_projection")):
            sd["text_encoder." + k] = v.clone()
    return sd


@pytest.fixture(scope="module")
def lamm_maple_dir(clip, tmp_path_factory):
    """An output directory as Dassl's `save_model` leaves it after 5 epochs (`save_checkpoint`):
    `MultiModalPromptLearner/model.pth.tar-5` = {"state_dict", "epoch", "optimizer", "scheduler",
    "val_result"}; the scheduler is Dassl's warm-up scheduler's state dict, which holds its
    successor, a whole CosineAnnealingLR object (with its SGD) - what the importer must read safely."""
    sd, (g, _) = _lamm_maple_state_dict(clip), golden("lamm_maple")
    trainable = [v.clone().requires_grad_() for k, v in sd.items() if f"param/{k}" in g]
    sgd = torch.optim.SGD(trainable, lr=0.0035, momentum=0.9, weight_decay=5e-4)
    for t in trainable:
        t.grad = torch.zeros_like(t)
    sgd.step()  # momentum buffers, as a trained run's optimizer holds them
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=5)
    scheduler = {"successor": cosine, "warmup_epoch": 1, "cons_lr": 1e-5, "finished": True,
                 "base_lrs": [0.0035], "last_epoch": 5, "_step_count": 6}
    out = tmp_path_factory.mktemp("lamm_maple_run")
    (out / "MultiModalPromptLearner").mkdir()
    file = out / "MultiModalPromptLearner" / "model.pth.tar-5"
    torch.save({"state_dict": sd, "epoch": 5, "optimizer": sgd.state_dict(), "scheduler": scheduler,
                "val_result": None}, file)
    del sd, trainable, sgd, cosine, scheduler
    yield out
    file.unlink()  # 540 MB (the whole CLIP in fp32, as the original saves it)


def import_lamm_maple(folder, clip, shots: int):
    """fp.load_original on the run's Dassl config (TRAINER.MAPLE section from the golden JSON) and
    LAMM's command-line flags with `shots`; no warning may come from fastprompt (a config name it
    ignores, or CLIP weights in the file that differ from the backbone)."""
    _, meta = golden("lamm_maple")
    c = meta["config"]
    maple = {k: c[k] for k in ("N_CTX", "CTX_INIT", "PROMPT_DEPTH", "PREC")}
    flags = {k: c[k] for k in ("triplet_loss", "origin_clip", "random_init", "eval_only")}
    config = {"TRAINER": {"NAME": "MaPLe", "MAPLE": maple}, "MODEL": {"BACKBONE": {"NAME": c["backbone"]}},
              "DATASET": {"SUBSAMPLE_CLASSES": c["DATASET.SUBSAMPLE_CLASSES"]}, "shots": shots, **flags}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = fp.load_original("maple+lamm", folder, clip, meta["classnames"], config=config)
    ours = [str(w.message) for w in seen if w.category.__module__.startswith("fastprompt")]
    assert not ours, f"importing the released MaPLe+LAMM checkpoint warned: {ours}"
    return model


def test_golden_lamm_maple_checkpoint_eval_logits(lamm_maple_dir, clip):
    g, _ = golden("lamm_maple")
    model = import_lamm_maple(lamm_maple_dir, clip, shots=16)
    model.eval()
    with torch.no_grad():
        gap = float((model(g["images"].float()) - g["logits"]).abs().max())
    assert gap <= LOGIT_ATOL, f"eval logits of the imported checkpoint differ by {gap:.3g} from the official's"


def test_golden_lamm_maple_checkpoint_loss_and_grads(lamm_maple_dir, clip):
    """shots 16 in the config: the golden loss and gradients (the parameter term weighted 1/16);
    shots 1 (the released scripts' default): the loss the README's recombination gives,
    golden + (1 - 1/16) * param_sum_sq, far outside the tolerance on these data."""
    g, _ = golden("lamm_maple")
    mapped = {our_name(k[len("param/"):]): k[len("param/"):] for k in g if k.startswith("param/")}
    model = import_lamm_maple(lamm_maple_dir, clip, shots=16)
    model.train()
    loss = model.loss(g["images"].float(), g["labels"])
    loss.backward()
    gap = float((loss.detach() - g["loss"]).abs())
    assert gap <= LOSS_ATOL, \
        f"imported with shots 16: loss {float(loss.detach()):.6f} vs official {float(g['loss']):.6f}"
    want, ours = expected_grads(g, mapped), model.trainable_state()
    assert sorted(want) == sorted(ours), "every trainable tensor needs a golden gradient"
    rel = {k: rel_grad_gap(ours[k].grad, ref) for k, ref in want.items()}
    bad = [f"{k} ({mapped[k]}): {r:.3g}" for k, r in rel.items() if r > GRAD_RTOL]
    assert not bad, "imported with shots 16: gradients differ (max|Δ|/max|g|): " + "; ".join(bad)

    extra = (1 - 1 / 16) * float(g["loss_terms/param_sum_sq"])
    assert extra > 10 * LOSS_ATOL, "on these data the shots weight would not show in the loss"
    one = import_lamm_maple(lamm_maple_dir, clip, shots=1)
    one.train()
    with torch.no_grad():
        loss1 = float(one.loss(g["images"].float(), g["labels"]))
    assert abs(loss1 - float(g["loss"])) > LOSS_ATOL, "shots 1 in the config gave the shots-16 loss"
    want1 = float(g["loss"]) + extra
    assert abs(loss1 - want1) <= LOSS_ATOL, \
        f"imported with shots 1: loss {loss1:.6f}, expected golden + 15/16 * param_sum_sq = {want1:.6f}"
