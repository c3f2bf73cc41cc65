"""Golden parity of Tip-Adapter and Tip-Adapter-F against gaopengcuhk/Tip-Adapter `d0e2d6f`
(main.py run_tip_adapter / run_tip_adapter_F, utils.py clip_classifier / build_cache_model /
search_hp), recorded on the parity ViT-B/16 (`shared/parity/tipadapter.*`, its README's
"tipadapter" section): the cache of the 10 cache images (one plain pass, as the golden run's
augment_epoch 1 without augmentation: `augment_epoch=0` here), the 7-template ImageNet classifier,
the tip logits at alpha/beta (1, 1), (1.17, 1), (10, 50) and with one template, Tip-Adapter-F's loss,
key gradient and the keys after one AdamW step of the released optimiser (its recipe here), the
search's accuracy at all 4,000 grid points (exactly) and its winner, and the release's files read
back with `fp.load_original`. Built as a user builds it: the parity backbone + `fp.create`.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastprompt as fp
from golden_common import FEATURE_ATOL, GRAD_RTOL, LOGIT_ATOL, LOSS_ATOL, golden, rel_grad_gap, require_parity

require_parity()
pytestmark = pytest.mark.golden

G, META = golden("tipadapter")
NAMES, ENSEMBLE = META["classnames"], META["prompt_template"]
SINGLE = ["a photo of a {}."]


@pytest.fixture(scope="module")
def parts(parity_clip):
    """(our image features of the cache images and of the test images), encoded once."""
    model = fp.create("tip_adapter", parity_clip, NAMES, templates=ENSEMBLE)
    with torch.no_grad():
        return model.encode(G["cache_images"].float()), model.encode(G["images"].float())


def build(clip, parts, method="tip_adapter", templates=ENSEMBLE, **options):
    model = fp.create(method, clip, NAMES, templates=templates, augment_epoch=0, **options)
    model.build_cache(parts[0], G["cache_labels"])
    return model


def test_cache_classifier_and_features(parity_clip, parts):
    model = build(parity_clip, parts)
    assert float((parts[0] - G["cache/image_features"]).abs().max()) < FEATURE_ATOL
    assert float((parts[1] - G["eval/image_features"]).abs().max()) < FEATURE_ATOL
    torch.testing.assert_close(model.cache_keys.detach(), G["cache_keys"].t(), atol=1e-6, rtol=0)
    single = fp.create("tip_adapter", parity_clip, NAMES, templates=SINGLE)
    for m, key in ((model, "clip_weights"), (single, "single_template/clip_weights")):
        torch.testing.assert_close(m.text_features(), G[key].t(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("key, templates, alpha, beta, atol", [
    ("logits", ENSEMBLE, 1.0, 1.0, LOGIT_ATOL),
    ("single_template/tip_logits", SINGLE, 1.0, 1.0, LOGIT_ATOL),
    ("imagenet_alpha/tip_logits", ENSEMBLE, 1.17, 1.0, LOGIT_ATOL),
    ("sharp/tip_logits", ENSEMBLE, 10.0, 50.0, 1e-3),  # the README's limit: exp magnifies rounding
], ids=["tip", "single-template", "imagenet-alpha", "sharp"])
def test_tip_logits(parity_clip, parts, key, templates, alpha, beta, atol):
    model = build(parity_clip, parts, templates=templates, alpha=alpha, beta=beta).eval()
    x = G["images"].float()
    with torch.no_grad():
        zero_shot = 100 * F.normalize(parts[1], dim=-1) @ model.text_features().t()
        clip_key = "clip_logits" if templates is ENSEMBLE else "single_template/clip_logits"
        assert float((zero_shot - G[clip_key]).abs().max()) < LOGIT_ATOL
        for logits in (model(x), model.classifier()(x)):
            gap = float((logits - G[key]).abs().max())
            assert gap < atol, f"{key}: max |Δlogits| = {gap:.3g}"


@pytest.mark.parametrize("prefix, alpha, beta, step_atol", [
    ("tipf", 1.0, 1.0, 5e-7), ("tipf_imagenet_alpha", 1.17, 1.0, 5e-7), ("tipf_sharp", 10.0, 50.0, 5e-6),
])
def test_tip_adapter_f_loss_grad_and_one_adamw_step(parity_clip, parts, prefix, alpha, beta, step_atol):
    from fastprompt.optim import make_optimizer
    from fastprompt.recipes import recipe_for

    model = build(parity_clip, parts, "tip_adapter_f", alpha=alpha, beta=beta).train()
    assert model.cache_keys.shape == G["param/adapter.weight"].shape == (META["num_trainable"] // 512, 512)
    torch.testing.assert_close(model.cache_keys.detach(), G["param/adapter.weight"], atol=1e-6, rtol=0)
    recipe = recipe_for("tip_adapter_f")
    optimizer = make_optimizer(model, recipe)
    for group in optimizer.param_groups:
        group["lr"] = recipe.lr_at_step(0, 1)  # CosineAnnealingLR's first step: lr itself
    loss = model.loss(G["images"].float(), G["labels"])
    assert abs(loss.item() - float(G[f"{prefix}/loss"])) < LOSS_ATOL
    loss.backward()
    gap = rel_grad_gap(model.cache_keys.grad, G[f"{prefix}/grad"])
    assert gap < GRAD_RTOL, f"{prefix}: max|Δgrad| / max|grad| = {gap:.3g}"
    optimizer.step()
    step_gap = float((model.cache_keys.detach() - G[f"{prefix}/weight_after_step"]).abs().max())
    assert step_gap < step_atol, f"{prefix}: keys after one AdamW step differ by {step_gap:.3g}"
    if prefix == "tipf":
        with torch.no_grad():
            after = model.eval()(G["images"].float())
        assert float((after - G["tipf/eval_tip_logits_after_step"]).abs().max()) < LOGIT_ATOL


def test_search_accuracy_at_every_grid_point_and_the_winner(parity_clip, parts):
    """search_hp on the oxford_flowers grid with the 10 cache images as validation set: all 4,000
    accuracies exactly, the first strict maximum (beta outer) as the winner; on the 2 test images
    nothing beats 0 % and the release returns (0, 0)."""
    flowers = META["config"]["search_hp"]["grids_per_config"]["oxford_flowers"]
    model = build(parity_clip, parts, search_beta=flowers["search_scale"][0],
                  search_alpha=flowers["search_scale"][1])
    val = F.normalize(parts[0], dim=-1)
    assert float((val - G["search_cache/val_features"]).abs().max()) < 1e-6
    found = model.search(val, G["cache_labels"])
    acc = found["grid"].float() * 100 / len(G["cache_labels"])
    mismatches = int((acc != G["search_cache/acc_grid"]).sum())
    assert mismatches == 0, f"{mismatches} of 4,000 grid points differ"
    win = META["config"]["search_hp"]["golden_search_on_cache_images"]
    assert (model.config.beta, model.config.alpha, found["val_acc"]) == (
        win["best_beta"], win["best_alpha"], win["best_acc"])
    assert model.config.beta in flowers["beta_list"] and model.config.alpha in flowers["alpha_list"]
    test = build(parity_clip, parts)  # the ImageNet grid of the golden run, on its 2 test images
    test.search(F.normalize(parts[1], dim=-1), G["labels"])
    nothing = META["config"]["search_hp"]["golden_search_on_2_test_images"]
    assert (test.config.beta, test.config.alpha) == (nothing["best_beta"], nothing["best_alpha"])


@pytest.mark.parametrize("method", ["tip_adapter", "tip_adapter_f"])
def test_release_files_import_to_the_golden_logits(parity_clip, tmp_path, method):
    """utils.py's keys_2shots.pt / values_2shots.pt and run_tip_adapter_F's best_F_2shots.pt (here
    the keys after the golden step) under the golden run's config (imagenet.yaml, ViT-B/16, alpha
    1): the 7-template prompt comes from the config's dataset."""
    torch.save(G["cache_keys"], tmp_path / "keys_2shots.pt")
    torch.save(G["cache_values"].half(), tmp_path / "values_2shots.pt")
    torch.save(nn.Parameter(G["tipf/weight_after_step"]), tmp_path / "best_F_2shots.pt")
    with pytest.warns(UserWarning, match="saves no searched alpha/beta"):
        model = fp.load_original(method, tmp_path, parity_clip, NAMES,
                                 config=META["config"]["golden_cfg"]).eval()
    assert model.config.templates == ENSEMBLE
    want = G["logits"] if method == "tip_adapter" else G["tipf/eval_tip_logits_after_step"]
    with torch.no_grad():
        assert float((model(G["images"].float()) - want).abs().max()) < LOGIT_ATOL


def test_every_released_config_gives_its_grid_and_init_values():
    """The cards' per-dataset settings reproduce each released configs/<dataset>.yaml: the exact
    float64 beta/alpha lists of search_hp's list comprehensions, init_alpha and init_beta."""
    from fastprompt.methods.tip_adapter import TipConfig
    from fastprompt.methods.tip_search import grid
    from fastprompt.recipes import recipe_for

    names = {"fgvc": "fgvc_aircraft"}
    for config, released in META["config"]["search_hp"]["grids_per_config"].items():
        for method in ("tip_adapter", "tip_adapter_f"):
            recipe = recipe_for(method, names.get(config, config))
            c = TipConfig(**{k: v for k, v in recipe.options.items() if k != "templates"})
            assert grid(c.search_beta, c.beta_steps) == released["beta_list"], config
            assert grid(c.search_alpha, c.alpha_steps) == released["alpha_list"], config
            assert (c.alpha, c.beta) == (released["init_alpha"], released["init_beta"]), config
            assert recipe.epochs == (released["train_epoch"] if method == "tip_adapter_f" else 0)


def test_every_released_dataset_gets_its_prompts():
    """Tip-Adapter's datasets/*.py templates (the JSON's table; ImageNet the 7-template ensemble)
    are what a run on each dataset gets: the card's ImageNet prompts, else CoOp's template of the
    dataset (jobs.method_options)."""
    from fastprompt.data import zero_shot_template
    from fastprompt.recipes import recipe_for

    table = {"imagenet": META["config"]["templates_imagenet"],
             **META["config"]["templates_other_datasets"]}
    for dataset, templates in table.items():
        name = {"fgvc": "fgvc_aircraft"}.get(dataset, dataset)
        got = recipe_for("tip_adapter", name).options.get("templates") or [zero_shot_template(name)]
        assert got == templates, dataset
