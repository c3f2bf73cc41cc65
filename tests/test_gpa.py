"""PromptSRC's Gaussian prompt aggregation through the training loop's hooks (tiny CLIP, CPU):
the weights, the running sum after each epoch's last step, the average as the saved model, a
resume that keeps the sum exact, and the checkpoints and settings a resume must refuse. The
weights themselves are checked against the released code's numbers in test_golden_promptsrc.py."""
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastprompt as fp
from fastprompt.errors import CheckpointError, InputError, TrainingError
from fastprompt.methods.promptsrc import gpa_weights
from fastprompt.recipes import Recipe
from fastprompt.training import train
from test_training_recipes import env, items, quiet

from common import killed_in_epoch, tiny_clip

RECIPE = Recipe(batch_size=4, lr=0.05, epochs=4)


def promptsrc(**options):
    torch.manual_seed(0)
    return fp.create("promptsrc", tiny_clip(), ["dog", "cat"], depth=3, **options)


def recorded(model):
    """The model, recording its learnable tensors after each epoch's last step."""
    snaps, end_epoch = [], model.end_epoch

    def record(epoch, epochs):
        snaps.append({k: p.detach().clone() for k, p in model.trainable_state().items()})
        end_epoch(epoch, epochs)
    model.end_epoch = record
    return model, snaps


def test_weights_are_the_normalised_gaussian():
    w = gpa_weights(3.0, 1.5, 6)
    dens = [math.exp(-0.5 * ((e - 3.0) / 1.5) ** 2) for e in range(1, 7)]
    assert w == pytest.approx([d / sum(dens) for d in dens], rel=1e-12)
    assert sum(w) == pytest.approx(1.0, abs=1e-15) and max(w) == w[2]
    # every density underflows (the released code divides 0 by 0): the same weights from the logs
    far = gpa_weights(400.0, 0.5, 4)
    assert all(math.isfinite(x) for x in far) and far[-1] == pytest.approx(1.0) and sum(far) == pytest.approx(1.0)


def test_the_saved_model_is_the_weighted_sum_of_the_epochs(tmp_path):
    model, snaps = recorded(promptsrc(gpa_mean=3.0, gpa_std=1.0))
    train(model, RECIPE, items(), tmp_path, env(), log=quiet)
    w = gpa_weights(3.0, 1.0, 4)
    saved = load_file(str(tmp_path / "adapter.safetensors"))
    state = load_file(str(tmp_path / "checkpoint.safetensors"))
    assert float(state["train_state/gpa/epochs"]) == 4
    for name, p in model.trainable_state().items():
        direct = sum(w[e] * snaps[e][name].double() for e in range(4))
        torch.testing.assert_close(p.detach().double(), direct, rtol=1e-6, atol=1e-8)
        assert torch.equal(saved[name], p.detach())
        assert torch.equal(state[f"train_state/gpa/{name}"], p.detach())  # the sum, complete
        # the checkpoint keeps the last epoch's tensors (what a resumed run continues from)
        assert torch.equal(state[f"param/{name}"], snaps[-1][name])
        assert (p.detach() - snaps[-1][name]).abs().max() > 1e-4


def test_gpa_off_keeps_the_last_epoch(tmp_path):
    model, snaps = recorded(promptsrc(gpa=False))
    train(model, RECIPE, items(), tmp_path, env(), log=quiet)
    assert all(torch.equal(p.detach(), snaps[-1][k]) for k, p in model.trainable_state().items())
    assert not [k for k in load_file(str(tmp_path / "checkpoint.safetensors")) if k.startswith("train_state/")]


def test_a_run_killed_and_resumed_ends_with_the_same_average(tmp_path, monkeypatch):


    train(promptsrc(), RECIPE, items(), tmp_path / "whole", env(), log=quiet)
    with killed_in_epoch(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        train(promptsrc(), RECIPE, items(), tmp_path / "part", env(), log=quiet)
    train(promptsrc(), RECIPE, items(), tmp_path / "part", env(), resume=True, log=quiet)
    for f in ("adapter.safetensors", "checkpoint.safetensors"):
        a, b = (load_file(str(tmp_path / d / f)) for d in ("whole", "part"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    # resuming the finished run changes nothing: the average is taken from the saved sum again
    again = promptsrc()
    train(again, RECIPE, items(), tmp_path / "part", env(), resume=True, log=quiet)
    whole = load_file(str(tmp_path / "whole" / "adapter.safetensors"))
    assert all(torch.equal(p.detach(), whole[k]) for k, p in again.trainable_state().items())


def _finished(tmp_path, epochs=2):
    train(promptsrc(), Recipe(batch_size=4, lr=0.05, epochs=epochs), items(), tmp_path, env(), log=quiet)
    return load_file(str(tmp_path / "checkpoint.safetensors")), tmp_path / "checkpoint.safetensors"


def test_resume_with_other_epochs_is_refused(tmp_path):
    """The weights so far were normalised over the run's epochs: a longer run would mix two
    Gaussians."""
    tensors, path = _finished(tmp_path)
    save_file(tensors, str(path), metadata={"epoch": "1"})
    with pytest.raises(TrainingError, match=r"weighs epochs 1\.\.2, this run has 3: resume with --epochs 2"):
        train(promptsrc(), Recipe(batch_size=4, lr=0.05, epochs=3), items(), tmp_path, env(), resume=True,
              log=quiet)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("train_state/gpa/ctx"), "lacks the GPA state 'gpa/ctx'"),
    (lambda t: t.__setitem__("train_state/gpa/extra", torch.zeros(1)), "holds the GPA state 'gpa/extra'"),
    (lambda t: t.__setitem__("train_state/gpa/ctx", torch.zeros(3, 32)), "'gpa/ctx' has shape"),
    (lambda t: t.__setitem__("train_state/gpa/epochs", torch.tensor(1.5)), "not a count of epochs"),
])
def test_damaged_gpa_state_is_refused(tmp_path, edit, message):
    tensors, path = _finished(tmp_path)
    edit(tensors)
    save_file(tensors, str(path), metadata={"epoch": "2"})
    with pytest.raises(CheckpointError, match=message):
        train(promptsrc(), Recipe(batch_size=4, lr=0.05, epochs=2), items(), tmp_path, env(), resume=True,
              log=quiet)


def test_a_gpa_checkpoint_does_not_resume_without_gpa(tmp_path):
    _finished(tmp_path)
    with pytest.raises(CheckpointError, match="holds the GPA state"):
        train(promptsrc(gpa=False), Recipe(batch_size=4, lr=0.05, epochs=2), items(), tmp_path, env(),
              resume=True, log=quiet)


@pytest.mark.parametrize("bad", [{"gpa_std": 0}, {"gpa_std": -1}])
def test_gpa_settings_must_make_a_gaussian(bad):
    with pytest.raises(InputError, match="needs a finite mean and a standard deviation > 0"):
        promptsrc(**bad)
