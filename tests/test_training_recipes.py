"""The training loop beyond Dassl's recipe: AdamW, a cosine stepped per iteration, a step budget
instead of epochs (CLIP-LoRA, Tip-Adapter-F), the methods' training hooks (PromptSRC's GPA,
Tip-Adapter's cache), and resuming all of it exactly; plus the checkpoints a resume must refuse."""
import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import fastprompt as fp
from fastprompt.data import Datum
from fastprompt.errors import CheckpointError, TrainingError
from fastprompt.recipes import Recipe
from fastprompt.training import TrainEnv, train

from common import killed_in_epoch, tiny_clip

ADAMW = dict(batch_size=4, lr=2e-3, warmup_epochs=0, optimizer="adamw", betas=(0.8, 0.95), eps=1e-6,
             weight_decay=0.02, schedule="iteration", min_lr=1e-5, shots=2, iterations_per_shot=5)


def items(n=10):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        pixels = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        out.append(Datum(None, i % 2, ["dog", "cat"][i % 2], image=Image.fromarray(pixels)))
    return out


def quiet(*_):
    pass


def coop():
    torch.manual_seed(0)
    return fp.create("coop", tiny_clip(), ["dog", "cat"])


def env():
    return TrainEnv(device=torch.device("cpu"), seed=1, progress=False)


def test_adamw_cosine_per_iteration_and_a_step_budget(tmp_path, monkeypatch):
    """10 images, batch 4: 2 steps an epoch; a budget of 5 x 2 shots = 10 steps is 5 epochs. Every
    step runs AdamW (the recipe's betas, eps, weight decay) at the rate torch's
    CosineAnnealingLR(T_max=10, eta_min) gives after that many scheduler steps (CLIP-LoRA's
    lora.py steps it after every optimiser step); the log records each step's rate."""
    recipe = Recipe(**ADAMW)
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=recipe.lr)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=10, eta_min=recipe.min_lr)
    want = []
    for _ in range(10):
        want.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    seen = []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        seen.append({k: self.param_groups[0][k] for k in ("lr", "betas", "eps", "weight_decay")})
        return step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    stats = train(coop(), recipe, items(), tmp_path, env(), log=quiet)
    assert stats["epochs"] == 5 and len(seen) == 10
    assert [s["lr"] for s in seen] == pytest.approx(want, rel=1e-12, abs=0)
    assert all(s["betas"] == (0.8, 0.95) and s["eps"] == 1e-6 and s["weight_decay"] == 0.02
               for s in seen)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2, 3, 4, 5]
    assert [lr for e in log for lr in e["lrs"]] == pytest.approx(want, rel=1e-12, abs=0)
    saved = load_file(str(tmp_path / "checkpoint.safetensors"))
    assert {"param/ctx", "optim/ctx/exp_avg", "optim/ctx/exp_avg_sq", "optim/ctx/step"} <= set(saved)
    assert float(saved["optim/ctx/step"]) == 10


def test_a_budget_ends_inside_an_epoch(tmp_path, monkeypatch):
    """7 steps of 2 an epoch: 4 epochs, the last one a single step."""
    calls = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (calls.append(1), step(self, *a, **k))[1])
    recipe = Recipe(**{**ADAMW, "iterations_per_shot": 7, "shots": 1})
    assert train(coop(), recipe, items(), tmp_path, env(), log=quiet)["epochs"] == 4
    assert len(calls) == 7
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [len(e["lrs"]) for e in log] == [2, 2, 2, 1] and log[-1]["images"] == 4


def test_adamw_run_killed_and_resumed_equals_the_whole_run(tmp_path, monkeypatch):

    whole, part = tmp_path / "whole", tmp_path / "part"
    train(coop(), Recipe(**ADAMW), items(), whole, env(), log=quiet)
    with killed_in_epoch(monkeypatch, 3), pytest.raises(KeyboardInterrupt):
        train(coop(), Recipe(**ADAMW), items(), part, env(), log=quiet)
    train(coop(), Recipe(**ADAMW), items(), part, env(), resume=True, log=quiet)
    a, b = (load_file(str(d / "checkpoint.safetensors")) for d in (whole, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / "log.jsonl").read_text().count("\n") == (part / "log.jsonl").read_text().count("\n")


class Hooked:
    """Records the training hooks and keeps a running sum of the context as its training state
    (the shape of PromptSRC's GPA), so resume must restore it for the final tensors to match."""

    @staticmethod
    def install(model, calls):
        model.total = torch.zeros_like(model.ctx)

        def begin(context):
            calls.append(("begin", len(context.train), len(context.val)))

        def end_epoch(epoch, epochs):
            calls.append(("end_epoch", epoch, epochs))
            model.total += model.ctx.detach()

        def end(context):
            calls.append(("end",))
            with torch.no_grad():
                model.ctx.copy_(model.total)

        def load_state(tensors, path):
            model.total = tensors["total"].clone()
        model.begin_training, model.end_epoch, model.end_training = begin, end_epoch, end
        model.training_state = lambda: {"total": model.total}
        model.load_training_state = load_state
        return model


def test_method_hooks_and_their_state_survive_a_resume(tmp_path, monkeypatch):

    recipe = Recipe(batch_size=4, lr=0.01, epochs=3)
    calls = []
    whole = Hooked.install(coop(), calls)
    train(whole, recipe, items(), tmp_path / "whole", env(), log=quiet, val=items(3))
    assert calls == [("begin", 10, 3), ("end_epoch", 0, 3), ("end_epoch", 1, 3), ("end_epoch", 2, 3),
                     ("end",)]
    saved = load_file(str(tmp_path / "whole" / "adapter.safetensors"))
    assert torch.equal(saved["ctx"], whole.ctx.detach())  # what end_training left is what is saved
    assert "train_state/total" in load_file(str(tmp_path / "whole" / "checkpoint.safetensors"))
    with killed_in_epoch(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        train(Hooked.install(coop(), []), recipe, items(), tmp_path / "part", env(), log=quiet)
    resumed = Hooked.install(coop(), [])
    train(resumed, recipe, items(), tmp_path / "part", env(), resume=True, log=quiet)
    assert torch.equal(resumed.ctx, whole.ctx)


def test_training_free_method_runs_its_hooks_with_zero_epochs(tmp_path):
    calls = []
    model = Hooked.install(coop(), calls)
    train(model, Recipe(epochs=0), items(), tmp_path, env(), log=quiet, val=items(2))
    assert calls == [("begin", 10, 2), ("end",)]
    assert (tmp_path / "adapter.safetensors").is_file() and not (tmp_path / "checkpoint.safetensors").exists()


def test_context_features_are_frozen_seeded_views(tmp_path):
    """`context.features`: test-transform features of every item, or `views` augmented passes at
    the recipe's crops, the same on a second call (a resumed run rebuilds the same cache)."""
    from fastprompt.training import TrainingContext

    model = coop()
    encode = model.backbone.encode_image
    context = TrainingContext(model, items(), [], env(), Recipe(crop_scale=(0.5, 1.0)))
    plain, labels = context.features(encode, items())
    assert plain.shape == (10, model.backbone.embed_dim) and labels.tolist() == [0, 1] * 5
    views, _ = context.features(encode, items(), views=3)
    again, _ = context.features(encode, items(), views=3)
    assert views.shape == (3, 10, model.backbone.embed_dim) and torch.equal(views, again)
    assert not torch.allclose(views[0], views[1]) and not views.requires_grad


# ------------------------------------------------------------------------------- refused resumes
def _finished(tmp_path, epochs=2):
    train(coop(), Recipe(batch_size=4, lr=0.01, epochs=epochs), items(), tmp_path, env(), log=quiet)
    return load_file(str(tmp_path / "checkpoint.safetensors")), tmp_path / "checkpoint.safetensors"


def _rewrite(path, tensors, meta):
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("key, dtype", [("param/ctx", torch.int32), ("momentum/ctx", torch.int64)])
def test_integer_tensors_are_refused_on_resume(tmp_path, key, dtype):
    tensors, path = _finished(tmp_path)
    tensors[key] = (tensors[key] * 100).to(dtype)
    _rewrite(path, tensors, {"epoch": "1"})
    with pytest.raises(CheckpointError, match=f"'{key}' in .* has dtype torch.int"):
        train(coop(), Recipe(batch_size=4, lr=0.01, epochs=2), items(), tmp_path, env(), resume=True, log=quiet)


@pytest.mark.parametrize("epoch", ["²", "١", "1.0", "-1", ""])
def test_epoch_metadata_must_be_ascii_digits(tmp_path, epoch):
    tensors, path = _finished(tmp_path)
    _rewrite(path, tensors, {"epoch": epoch})
    with pytest.raises(CheckpointError, match="records no valid 'epoch'"):
        train(coop(), Recipe(batch_size=4, lr=0.01, epochs=2), items(), tmp_path, env(), resume=True, log=quiet)


def test_resume_past_the_requested_epochs_is_refused(tmp_path):
    _finished(tmp_path, epochs=2)
    with pytest.raises(TrainingError, match="holds 2 finished epochs .* more than the 1"):
        train(coop(), Recipe(batch_size=4, lr=0.01, epochs=1), items(), tmp_path, env(), resume=True, log=quiet)


def test_resume_on_other_backbone_weights_is_refused(tmp_path, capsys):
    from fastprompt.train import main

    out = tmp_path / "r"
    common = ["--method", "coop", "--shots", "2", "--batch-size", "8", "--no-progress", "--out", str(out)]
    assert main([*common, "--epochs", "1", "--pretrained", "none"]) == 0
    capsys.readouterr()
    code = main([*common, "--epochs", "2", "--pretrained", "none", "--backbone-seed", "5", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "backbone weights" in err, err
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["epoch"] == 1


def test_disk_full_during_the_checkpoint_is_one_line_and_keeps_the_log(tmp_path, capsys, monkeypatch):
    """The safetensors writer's own error (what it raises on a full disk, measured: SafetensorError
    'I/O error: No space left on device (os error 28)') is the CLI's one line naming the file; the
    epoch's log line is kept, the previous checkpoint too, and --resume reruns that epoch."""
    import safetensors.torch as st

    from fastprompt.train import main

    out = tmp_path / "r"
    common = ["--method", "coop", "--shots", "2", "--batch-size", "8", "--no-progress", "--out",
              str(out), "--epochs", "2"]
    real = st.save_file
    calls = []

    class SafetensorError(Exception):
        pass

    def full_on_epoch_2(tensors, path, metadata=None):
        calls.append(metadata)
        if (metadata or {}).get("epoch") == "2":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)
    monkeypatch.setattr(st, "save_file", full_on_epoch_2)
    code = main(common)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err, err
    assert str(out / "checkpoint.safetensors") in err and "Traceback" not in err
    assert [json.loads(x)["epoch"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(st, "save_file", real)
    assert main([*common, "--resume"]) == 0
    assert [json.loads(x)["epoch"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_recipe_fields_name_what_is_wrong():
    from fastprompt.errors import InputError
    from fastprompt.recipes import recipe_for

    with pytest.raises(InputError, match="'optimizer' must be one of sgd, adamw"):
        recipe_for("coop", optimizer="adam")
    with pytest.raises(InputError, match="'schedule' must be one of"):
        recipe_for("coop", schedule="linear")
    r = Recipe(lr=1.0, schedule="iteration", min_lr=0.5, iterations_per_shot=2, shots=2, warmup_epochs=0)
    assert r.total_steps(3) == 4 and r.total_epochs(3) == 2
    assert r.lr_at_step(2, 3) == pytest.approx(0.5 + 0.5 * (1 + math.cos(math.pi / 2)) / 2)
