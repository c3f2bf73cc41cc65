"""Golden parity of CLIP-Adapter against gaopengcuhk/CLIP-Adapter `08d07f8` clip_adapter.py (run
inside CoOp `ff61507`'s clip/ package; `shared/parity/clipadapter.*`, its README's "clipadapter"
section): the adapter's golden weights copied in, eval logits, the training loss and both weight
gradients at the README's tolerances, the image/text features and the adapter's output as
diagnostics, and the weights written as the trainer saves them (Dassl's
`clip_adapter/model.pth.tar-<epoch>`, the adapter's state dict) read back with `fp.load_original`.
"""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

import fastprompt as fp
from golden_common import FEATURE_ATOL, GRAD_RTOL, LOGIT_ATOL, LOSS_ATOL, golden, rel_grad_gap, require_parity

require_parity()
pytestmark = pytest.mark.golden

G, META = golden("clipadapter")
PARAMS = {k[len("param/"):]: v.float() for k, v in G.items() if k.startswith("param/")}


def build(clip):
    """The released template of the golden run (CUSTOM_TEMPLATES['ImageNet']) and its weights."""
    model = fp.create("clip_adapter", clip, META["classnames"], templates=[META["prompt_template"]])
    ours = model.trainable_state()
    assert sorted(ours) == sorted(PARAMS)  # the release's names: adapter.fc.{0,2}.weight
    assert sum(p.numel() for p in ours.values()) == META["num_trainable"]
    with torch.no_grad():
        for name, value in PARAMS.items():
            ours[name].copy_(value)
    return model


def test_golden_logits_and_features(parity_clip):
    model = build(parity_clip).eval()
    x = G["images"].float()
    with torch.no_grad():
        f = model.encode(x)
        assert float((f - G["eval/image_features"]).abs().max()) < FEATURE_ATOL
        assert float((model.adapter(f) - G["eval/adapter_output"]).abs().max()) < FEATURE_ATOL
        text = model.encode_text(model.template)
        assert float((text - G["eval/text_features"]).abs().max()) < FEATURE_ATOL
        for logits in (model(x), model.classifier()(x)):
            gap = float((logits - G["logits"]).abs().max())
            assert gap < LOGIT_ATOL, f"max |Δlogits| = {gap:.3g}"


def test_golden_loss_and_grads(parity_clip):
    model = build(parity_clip).train()
    loss = model.loss(G["images"].float(), G["labels"])
    assert abs(loss.item() - float(G["loss"])) < LOSS_ATOL
    loss.backward()
    assert not any(p.grad is not None for p in model.backbone.parameters())
    for name, p in model.trainable_state().items():
        gap = rel_grad_gap(p.grad, G[f"grad/{name}"])
        assert gap < GRAD_RTOL, f"{name}: max|Δgrad| / max|grad| = {gap:.3g}"


def test_golden_weights_from_the_trainers_checkpoint(parity_clip, tmp_path):
    folder = tmp_path / "output" / "clip_adapter"
    folder.mkdir(parents=True)
    sd = OrderedDict((k[len("adapter."):], G[f"param/{k}"]) for k in PARAMS)  # fp16, as saved
    torch.save({"state_dict": sd, "epoch": 200, "optimizer": {}, "scheduler": None,
                "val_result": None}, folder / "model.pth.tar-200")
    model = fp.load_original("clip_adapter", tmp_path / "output", parity_clip, META["classnames"],
                             config={"DATASET": {"NAME": META["config"]["DATASET.NAME"]}}).eval()
    assert model.config.templates == [META["prompt_template"]] and model.config.reduction == 4
    with torch.no_grad():
        assert float((model(G["images"].float()) - G["logits"]).abs().max()) < LOGIT_ATOL


def test_every_dataset_gets_the_releases_prompt():
    """clip_adapter.py's CUSTOM_TEMPLATES (the JSON's table) is CoOp's template of each dataset,
    what a run gets (jobs.method_options) and what an import reads from DATASET.NAME."""
    from fastprompt.data import canonical_name, zero_shot_template

    for dataset, template in META["config"]["templates"].items():
        assert zero_shot_template(canonical_name(dataset)) == template, dataset
