"""Tip-Adapter(-F) and CLIP-Adapter as a user runs them (#24): the cache built in training from the
seeded augmented views, α/β searched on the validation split, the release's test-set selection only
on request, novel classes scored by the zero-shot part (and the run saying so), Tip-Adapter-F's
epoch choice surviving a resume, save/load, ViT-B/16 parameter counts."""
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fastprompt as fp
from common import images, killed_in_epoch, tiny_clip
from fastprompt.context import TrainingContext
from fastprompt.data import Datum
from fastprompt.errors import CheckpointError, InputError
from fastprompt.recipes import recipe_for
from fastprompt.training import TrainEnv, train

NAMES = ["dog", "cat", "fox"]


def items(per_class=4, seed=0, names=NAMES):
    """In-memory images whose colour depends on the class (features that differ by class)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(per_class * len(names)):
        c = i % len(names)
        base = torch.tensor([60.0 + 80 * c, 200.0 - 70 * c, 120.0])
        pixels = (base + 60 * torch.rand(40, 40, 3, generator=g)).clamp(0, 255).to(torch.uint8)
        out.append(Datum(None, c, names[c], image=Image.fromarray(pixels.numpy())))
    return out


def env():
    return TrainEnv(device=torch.device("cpu"), seed=1, progress=False)


def quiet(*_):
    pass


def make(method, **options):
    torch.manual_seed(0)
    return fp.create(method, tiny_clip(), NAMES, **options)


# ------------------------------------------------------------------------------- Tip-Adapter
def test_cache_from_seeded_views_alpha_beta_from_val_and_saved(tmp_path):
    model = make("tip_adapter", augment_epoch=3)
    recipe = recipe_for("tip_adapter")
    assert recipe.crop_scale == (0.5, 1.0) and not recipe.trains
    train(model, recipe, items(), tmp_path / "run", env(), log=quiet, val=items(2, seed=1))
    # the cache: 3 passes of the recipe's crops, seeded by the run (what a resumed run rebuilds)
    context = TrainingContext(model, items(), [], env(), recipe)
    views, labels = context.features(model.encode, items(), views=3)
    assert not torch.equal(views[0], views[1])  # the passes are augmented
    torch.testing.assert_close(model.cache_keys.detach(), F.normalize(views.mean(0), dim=-1), atol=0, rtol=0)
    assert torch.equal(model.cache_labels, labels.float()) and model.config.cache_size == 12
    # alpha, beta: the search's winner on the validation features
    val, val_labels = context.features(model.encode, items(2, seed=1))
    again = dataclasses.replace(model.config)
    found = model.search(F.normalize(val, dim=-1), val_labels)
    assert (found["beta"], found["alpha"]) == (again.beta, again.alpha) != (1.0, 1.17)
    assert any("searched on 6 validation images" in n for n in model.evaluation_notes([]))
    # everything the model needs is saved: cache, alpha, beta
    loaded = fp.load(tmp_path / "run", clip=tiny_clip()).eval()
    assert (loaded.config.alpha, loaded.config.beta) == (again.alpha, again.beta)
    x = images(3)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_training_free_refuses_epochs_and_imagenet_keeps_its_init_values(tmp_path):
    with pytest.raises(InputError, match="training-free: use --epochs 0, or tip_adapter_f"):
        train(make("tip_adapter", augment_epoch=1), dataclasses.replace(recipe_for("tip_adapter"), epochs=2),
              items(), tmp_path / "a", env(), log=quiet)
    from fastprompt.prompts import ENSEMBLE_TEMPLATES

    options = recipe_for("tip_adapter", "imagenet").options
    assert options["templates"] == list(ENSEMBLE_TEMPLATES) and options["search"] is False
    model = make("tip_adapter", augment_epoch=1, search=False)
    train(model, recipe_for("tip_adapter"), items(), tmp_path / "b", env(), log=quiet, val=items(1, 2))
    assert (model.config.alpha, model.config.beta) == (1.17, 1.0)
    assert "not searched (search=false)" in model.evaluation_notes([])[0]
    with pytest.warns(UserWarning, match="select_on_test=true: alpha/beta .* optimistic"):
        model = make("tip_adapter", augment_epoch=1, search=False, select_on_test=True)
        train(model, recipe_for("tip_adapter"), items(), tmp_path / "c", env(), log=quiet, val=items(1, 2))
    assert any("searched on 3 validation images" in n for n in model.evaluation_notes([]))


def test_novel_classes_get_the_zero_shot_part_only():
    model = make("tip_adapter", alpha=5.0, beta=3.0)
    model.build_cache(model.encode(images(6, seed=4)), torch.arange(3).repeat(2))
    novel = ["red apple", "sports_car"]
    zero = make("zeroshot")
    x = images(4, seed=9)
    with torch.no_grad():
        scale = 100 / zero.backbone.logit_scale()
        torch.testing.assert_close(model.classifier(novel)(x), scale * zero.classifier(novel)(x),
                                   atol=1e-4, rtol=1e-5)
        mixed = model.classifier(["cat", *novel])(x)  # a base class keeps its cache term
        assert torch.allclose(mixed[:, 1:], scale * zero.classifier(novel)(x), atol=1e-4)
        assert torch.allclose(mixed[:, 0], model.eval()(x)[:, 1], atol=1e-5)
    assert "the 2 novel classes have no cache entries" in model.evaluation_notes(novel)[-1]


def test_fit_base_to_novel_says_what_novel_means(tmp_path):
    config = fp.TrainConfig(method="tip_adapter", shots=2, options={"augment_epoch": 1},
                            zero_shot_ref="always", device="cpu", progress=False, out=str(tmp_path / "r"))
    lines = []
    metrics = fp.fit(config, log=lines.append)
    assert metrics["novel_acc"] == metrics["zeroshot_ref"]["novel_acc"]
    assert any("novel classes have no cache entries" in n for n in metrics["notes"])
    assert any(line.startswith("note: alpha/beta searched on") for line in lines)
    again = fp.evaluate(tmp_path / "r", device="cpu", log=lines.append)
    assert again["novel_acc"] == metrics["novel_acc"] and "notes" in again


def test_altered_cache_labels_are_one_line_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make("tip_adapter")
    model.build_cache(model.encode(images(6, seed=4)), torch.arange(3).repeat(2))
    run = fp.save(model, tmp_path / "run")
    tensors = load_file(str(run / "adapter.safetensors"))
    tensors["cache_labels"][0] = 7.0
    save_file(tensors, str(run / "adapter.safetensors"))
    bad = fp.load(run, clip=tiny_clip())
    with pytest.raises(CheckpointError, match="cache labels .* are not class indices 0..2"):
        bad.classifier()
    with pytest.raises(ValueError, match=r"must be \[N, 32\] / \[N\]"):
        model.set_cache(torch.zeros(4, 8), torch.zeros(4))


# ----------------------------------------------------------------------------- Tip-Adapter-F
def _tip_f_recipe(epochs=4):
    return dataclasses.replace(recipe_for("tip_adapter_f"), batch_size=4, epochs=epochs, lr=0.05)


def _snapshots(model, keep):
    end_epoch = model.end_epoch

    def record(epoch, epochs):
        keep.append(model.cache_keys.detach().clone())
        end_epoch(epoch, epochs)
    model.end_epoch = record
    return model


@pytest.mark.parametrize("select", [False, True])
def test_tip_f_keeps_the_last_epoch_or_on_request_the_best(select, tmp_path):
    """Default: the last epoch's keys. select_on_test: the first epoch with the most correct
    validation predictions at the init alpha/beta (main.py's rule, on its test split)."""
    snaps, val = [], items(2, seed=1)
    model = _snapshots(make("tip_adapter_f", augment_epoch=1, select_on_test=select, search=False), snaps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(model, _tip_f_recipe(), items(), tmp_path, env(), log=quiet, val=val)
    assert len(snaps) == 4 and not torch.equal(snaps[0], snaps[-1])
    if not select:
        assert torch.equal(model.cache_keys.detach(), snaps[-1])
        return
    f, y = TrainingContext(model, [], val, env(), None).features(model.encode, val)
    f = F.normalize(f, dim=-1)
    from fastprompt.methods.tip_adapter import tip_logits

    correct = [int((tip_logits(f, model.text_features(), k, model.cache_values(), 1.17, 1.0)
                    .argmax(-1) == y).sum()) for k in snaps]
    best = correct.index(max(correct))
    assert max(correct) > 0 and best != len(snaps) - 1  # the rule is seen: not the last epoch
    assert correct.count(max(correct)) > 1  # ... and a tie: the first of them is kept
    assert torch.equal(model.cache_keys.detach(), snaps[best]), correct


def test_tip_f_killed_and_resumed_equals_the_whole_run(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    def run(out, resume=False):
        model = make("tip_adapter_f", augment_epoch=2, select_on_test=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(model, _tip_f_recipe(), items(), out, env(), resume=resume, log=quiet, val=items(2, seed=1))
        return model
    whole = run(tmp_path / "whole")
    with killed_in_epoch(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        run(tmp_path / "part")
    assert "train_state/best_keys" in load_file(str(tmp_path / "part" / "checkpoint.safetensors"))
    part = run(tmp_path / "part", resume=True)
    assert torch.equal(part.cache_keys, whole.cache_keys) and part._best[1] == whole._best[1]
    assert (part.config.alpha, part.config.beta) == (whole.config.alpha, whole.config.beta)


# ------------------------------------------------------------------------------ ViT-B/16 counts
def test_vit_b16_parameter_counts():
    """METHODS.md: CLIP-Adapter 512 -> 128 -> 512 without biases = 131,072; Tip-Adapter-F trains
    its N·K x 512 keys (the parity run's 10 keys: 5,120); Tip-Adapter trains nothing."""
    clip = fp.load_clip("ViT-B-16", pretrained=None)
    counts = {}
    for method in ("clip_adapter", "tip_adapter", "tip_adapter_f"):
        model = fp.create(method, clip, ["cat", "dog", "car", "tree", "ship"],
                          **({"cache_size": 10} if method != "clip_adapter" else {}))
        counts[method] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts == {"clip_adapter": 131_072, "tip_adapter": 0, "tip_adapter_f": 5_120}
