"""Golden parity of CLIP-LoRA against the authors' own code (`pytest -m golden`).

`shared/parity/cliplora.*` (its README, "CLIP-LoRA, Tip-Adapter(-F) and CLIP-Adapter") is one
official run of MaxZanella/CLIP-LoRA `358f0d7` (`lora.run_lora`, `loralib/`) on the parity ViT-B/16:
r 2, alpha 1, q/k/v of all 12 blocks of both towers, the 144 LoRA tensors set to known values. It
holds the eval logits (merged weights), one training iteration's loss, logits and every gradient
with the LoRA dropout off, and the same iteration with the released dropout 0.25 drawn after
`torch.manual_seed(0)` (`dropout_on/*`). Here the model is built as a user builds it (`parity_clip`
+ `fp.create("clip_lora", ...)` with the run's options), the official tensors are copied in by the
names the JSON describes (`[visual.]transformer.resblocks.<i>.attn.<p>_proj.w_lora_<A|B>` ->
`{text|vision}.<i>.<p>.<A|B>`, typed out here), and the training checks run on both the fast path
and the original-style one (`set_fast(False)`). The last tests write the golden tensors as the
release's `save_lora` writes them and import the file (`fp.load_original`).
"""
from __future__ import annotations

import re
import warnings

import pytest
import torch

import fastprompt as fp
from golden_common import GRAD_RTOL, LOGIT_ATOL, LOSS_ATOL, golden, rel_grad_gap, require_parity

require_parity()
pytestmark = pytest.mark.golden

NAME = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.attn\.([qkv])_proj\.w_lora_([AB])$")


def options(config: dict, dropout: float) -> dict:
    """fp.create options of the official run's config (run_utils.py argument names)."""
    return {"r": config["r"], "alpha": config["alpha"], "encoder": config["encoder"],
            "params": "".join(config["params"]), "position": "all", "dropout": dropout}


def our_name(official: str) -> str:
    m = NAME.match(official)
    assert m, official
    return f"{'vision' if m.group(1) else 'text'}.{m.group(2)}.{m.group(3)}.{m.group(4)}"


def build(clip, dropout: float, fast: bool = True):
    g, meta = golden("cliplora")
    model = fp.create("clip_lora", clip, meta["classnames"], **options(meta["config"], dropout))
    ours = model.trainable_state()
    official = {k[len("param/"):]: v for k, v in g.items() if k.startswith("param/")}
    mapped = {our_name(k): k for k in official}
    assert sorted(mapped) == sorted(ours)
    assert sum(p.numel() for p in ours.values()) == meta["num_trainable"] == 184_320
    with torch.no_grad():
        for mine, theirs in mapped.items():
            ours[mine].copy_(official[theirs].float())
    return model.set_fast(fast), g, mapped


def gap(a, b) -> float:
    return float((a - b).abs().max())


def test_golden_cliplora_eval_logits_merged(parity_clip):
    """Eval: s·B@A merged into the weights (the release's `eval()`), 100·cos; the classifier (the
    inference and export path) gives the same; the features locate a difference by tower."""
    model, g, _ = build(parity_clip, 0.25)
    model.eval()
    x = g["images"].float()
    with torch.no_grad():
        logits = model(x)
        img = model.backbone.encode_image(x, model.image_hooks(), model.opts)
        txt = model.encode_text(model.template)
        clf = model.classifier()(x)
    where = (f"image features {gap(img, g['eval/image_features']):.3g}, text features "
             f"{gap(txt, g['eval/text_features']):.3g}")
    assert gap(logits, g["logits"]) <= LOGIT_ATOL, f"eval logits differ: {where}"
    assert gap(img, g["eval/image_features"]) <= 1e-4 and gap(txt, g["eval/text_features"]) <= 1e-4, where
    assert gap(logits / 100, g["eval/cosine_similarity"]) <= 1e-6  # the logit scale is the int 100
    assert torch.equal(clf, logits)


def test_golden_cliplora_zero_shot_baseline(parity_clip):
    """B = 0: plain CLIP with the logit scale 100 (run_lora's zero-shot line before apply_lora)."""
    model, g, _ = build(parity_clip, 0.25)
    with torch.no_grad():
        for name, p in model.trainable_state().items():
            if name.endswith(".B"):
                p.zero_()
        logits = model.eval()(g["images"].float())
    assert gap(logits, g["zeroshot/logits"]) <= LOGIT_ATOL


def check_training(model, g, mapped, prefix: str, logits_key: str):
    loss, logits = model.loss_and_logits(g["images"].float(), g["labels"])
    loss.backward()
    assert abs(float(loss.detach()) - float(g[f"{prefix}loss"])) <= LOSS_ATOL, \
        f"loss {float(loss.detach()):.6f} vs official {float(g[prefix + 'loss']):.6f}"
    assert gap(logits.detach(), g[logits_key]) <= LOGIT_ATOL
    bad = []
    for mine, theirs in mapped.items():
        got = model.trainable_state()[mine].grad
        assert got is not None, f"no gradient reached {mine}"
        rel = rel_grad_gap(got, g[f"{prefix}grad/{theirs}"])
        if rel > GRAD_RTOL:
            bad.append(f"{mine} ({theirs}): {rel:.3g}")
    assert not bad, "gradients differ from the official code (max|Δ|/max|g|): " + "; ".join(bad)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_golden_cliplora_training_dropout_off(parity_clip, fast):
    """One iteration, unmerged, dropout off: the loss, the logits and all 144 gradients."""
    model, g, mapped = build(parity_clip, 0.0, fast)
    check_training(model.train(), g, mapped, "", "train/logits")


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_golden_cliplora_training_dropout_on(parity_clip, fast):
    """The released dropout 0.25, its masks drawn as the release draws them: torch.manual_seed(0)
    right before the forward, one [L, N, D] mask per projection, text tower first (README: drawing
    the towers in the other order moves the logits by 1.04)."""
    model, g, mapped = build(parity_clip, 0.25, fast)
    model.train()
    torch.manual_seed(0)
    check_training(model, g, mapped, "dropout_on/", "dropout_on/train_logits")


# ------------------------------------------------------- the released file through the importer
def save_lora_payload() -> dict:
    """What `loralib/utils.py save_lora` writes for the golden run: `weights['layer_k']` over
    `list_lora_layers` (apply_lora: text blocks 0..11, then vision blocks 0..11), each
    {'q_proj', 'k_proj', 'v_proj'} -> {'w_lora_A', 'w_lora_B'} (the parameters' .data, fp32), and
    the metadata r, alpha, encoder, params, position (run_utils.py's values)."""
    g, meta = golden("cliplora")
    c = meta["config"]
    weights = {}
    for k, prefix in enumerate([f"transformer.resblocks.{i}.attn" for i in range(12)]
                               + [f"visual.transformer.resblocks.{i}.attn" for i in range(12)]):
        weights[f"layer_{k}"] = {f"{p}_proj": {f"w_lora_{m}": g[f"param/{prefix}.{p}_proj.w_lora_{m}"].float()
                                                for m in "AB"} for p in c["params"]}
    return {"weights": weights, "metadata": {"r": c["r"], "alpha": c["alpha"], "encoder": c["encoder"],
                                             "params": list(c["params"]), "position": "all"}}


@pytest.fixture(scope="module")
def released_file(tmp_path_factory):
    """<save_path>/vitb16/dtd/1shots/seed1/lora_weights.pt, where save_lora puts it."""
    root = tmp_path_factory.mktemp("clip_lora_run")
    folder = root / "vitb16" / "dtd" / "1shots" / "seed1"
    folder.mkdir(parents=True)
    torch.save(save_lora_payload(), folder / "lora_weights.pt")
    return root


def test_golden_cliplora_released_file_imported(parity_clip, released_file):
    """fp.load_original finds the file under the save path, reads it with the restricted unpickler,
    takes r / alpha / encoder / params / position from its metadata (the release's own arguments
    accepted without a warning) and computes the golden eval logits."""
    g, meta = golden("cliplora")
    args = dict(meta["config"]["golden_run_args"])  # run_utils.py's arguments of the golden run
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = fp.load_original("clip_lora", released_file, parity_clip, meta["classnames"], config=args)
    assert not [str(w.message) for w in seen if w.category.__module__.startswith("fastprompt")]
    assert model.config.dropout == 0.25 and model.scale == pytest.approx(2 ** -0.5)
    with torch.no_grad():
        assert gap(model.eval()(g["images"].float()), g["logits"]) <= LOGIT_ATOL


@pytest.mark.parametrize("config, needle", [
    ({"r": 4}, "records r=2 in its metadata, the config says r=4"),
    ({"params": ["q", "v"]}, "records params=\\['q', 'k', 'v'\\]"),
    ({"position": "up"}, "records position='all'"),
])
def test_golden_cliplora_metadata_mismatch_is_refused(parity_clip, released_file, config, needle):
    """load_lora's refusal: metadata that differs from the arguments given is an error."""
    from fastprompt.original import OriginalCheckpointError

    _, meta = golden("cliplora")
    with pytest.raises(OriginalCheckpointError, match=needle):
        fp.load_original("clip_lora", released_file, parity_clip, meta["classnames"], config=config)
