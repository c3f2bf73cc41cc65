"""Packed training (`fastprompt.sweep.train_packed`): runs of one method stepped together, one
backbone pass per step, each run ending exactly where it ends alone."""
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import fastprompt as fp
import fastprompt.pack as pack_module
from fastprompt.data import Datum
from fastprompt.errors import TrainingError
from fastprompt.recipes import Recipe
from fastprompt.sweep import train_packed
from fastprompt.training import TrainEnv, Trainer, train

from common import perturb, tiny_clip

CLASSES = ["dog", "cat", "car"]


def items(seed, n=12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        pixels = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        out.append(Datum(None, i % 3, CLASSES[i % 3], image=Image.fromarray(pixels)))
    return out


def quiet(*_):
    pass


def model(method, seed):
    torch.manual_seed(seed)
    return fp.create(method, tiny_clip(), CLASSES)


def env(seed):
    return TrainEnv(device=torch.device("cpu"), seed=seed, progress=False)


#: three runs of one method: other seeds, other data, other recipes (epochs, batch, lr)
RUNS = [(1, Recipe(batch_size=4, lr=0.01, epochs=3)), (2, Recipe(batch_size=4, lr=0.02, epochs=2)),
        (3, Recipe(batch_size=4, lr=0.005, epochs=4, warmup_epochs=0))]


def solo(method, tmp_path):
    for seed, recipe in RUNS:
        train(model(method, seed), recipe, items(seed), tmp_path / f"solo{seed}", env(seed), log=quiet)


class Entry:
    """What train_packed takes from a run that enters the pack (sweep.Entry without a run dir)."""

    def __init__(self, trainer, seed):
        self.trainer, self.seed, self.aborted = trainer, seed, None

    def finish(self, stats):
        return self.seed, stats

    def abort(self, err):
        self.aborted = err


def starts(method, tmp_path, resume=False, recipes=None):
    out = []
    for seed, recipe in (recipes or RUNS):
        def start(seed=seed, recipe=recipe):
            t = Trainer(model(method, seed), recipe, items(seed), tmp_path / f"pack{seed}", env(seed),
                        resume=resume, log=quiet)
            return Entry(t, seed)
        out.append(start)
    return out


#: the bound on a packed run's tensors against its solo run's, per tensor, relative to the tensor's
#: largest value: a merged pass adds rows to each matmul, which may change how the CPU blocks
#: them, i.e. the rounding; measured on the 2-core VM (torch 2.14.1): up to 1.9e-5 (MMA), 5.4e-5
#: (CLIP-LoRA, 2026-12-07)
PACK_RTOL = 2e-4


def same_checkpoints(a, b):
    """max over tensors of max|Δ| / max|t| between two runs' last checkpoints (False: other keys)."""
    x, y = load_file(str(a / "checkpoint.safetensors")), load_file(str(b / "checkpoint.safetensors"))
    return x.keys() == y.keys() and max(
        float((x[k] - y[k]).abs().max() / x[k].abs().max().clamp_min(1e-12)) for k in x)


@pytest.mark.parametrize("method", ["coop", "maple", "mma", "clip_lora"])
def test_a_pack_trains_each_run_as_alone(method, tmp_path, monkeypatch):
    """Three runs packed two at a time (the third joins when the second-shortest leaves): every
    tensor of each run's last checkpoint (parameters and momentum) equals its solo run's within
    PACK_RTOL, the same number of epochs is logged, and the backbone ran merged passes (CLIP-LoRA's
    runs with their dropout, each drawing its masks from its own run's stream)."""
    solo(method, tmp_path)
    merged = []
    merge_rows = pack_module._merge_rows
    monkeypatch.setattr(pack_module, "_merge_rows",
                        lambda group, *a, **k: (merged.append(len(group)), merge_rows(group, *a, **k))[1])
    results = train_packed(starts(method, tmp_path), size=2, log=quiet)
    assert [r[0] for r in results] == [1, 2, 3] and [r[1]["epochs"] for r in results] == [3, 2, 4]
    assert merged and max(merged) == 2
    for seed, _ in RUNS:
        gap = same_checkpoints(tmp_path / f"solo{seed}", tmp_path / f"pack{seed}")
        assert gap is not False and gap <= PACK_RTOL, (seed, gap)
        logs = [(tmp_path / f"{k}{seed}" / "log.jsonl").read_text().count("\n") for k in ("solo", "pack")]
        assert logs[0] == logs[1]


def test_a_failing_run_leaves_and_the_others_finish(tmp_path):
    recipes = [(1, Recipe(batch_size=4, lr=0.01, epochs=2)),
               (2, Recipe(batch_size=4, lr=1e32, epochs=2, warmup_epochs=0))]
    results = train_packed(starts("coop", tmp_path, recipes=recipes), size=2, log=quiet)
    assert results[0][0] == 1 and isinstance(results[1], TrainingError)
    assert "NaN/inf" in str(results[1])
    train(model("coop", 1), recipes[0][1], items(1), tmp_path / "solo1", env(1), log=quiet)
    assert same_checkpoints(tmp_path / "solo1", tmp_path / "pack1") <= PACK_RTOL


def test_a_killed_pack_resumes_each_run_from_its_own_epoch(tmp_path, monkeypatch):
    import fastprompt.sweep as sweep

    solo("coop", tmp_path)
    advance, calls = sweep._advance, []

    def killed_at_step_5(seat):
        calls.append(1)
        if len(calls) == 3 * 5:  # the fifth step of the pack of three
            raise KeyboardInterrupt
        return advance(seat)
    monkeypatch.setattr(sweep, "_advance", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_packed(starts("coop", tmp_path), size=3, log=quiet)
    monkeypatch.setattr(sweep, "_advance", advance)
    train_packed(starts("coop", tmp_path, resume=True), size=3, log=quiet)
    for seed, _ in RUNS:
        gap = same_checkpoints(tmp_path / f"solo{seed}", tmp_path / f"pack{seed}")
        assert gap is not False and gap <= PACK_RTOL, (seed, gap)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_merged_lora_text_pass_equals_each_run_alone(fast):
    """Two CLIP-LoRA runs' text passes merged by a Pack (each with its own deltas and dropout
    stream, in chunks of 2 sequences that cut across the runs' segments) give each run the
    features, and the gradients, of its pass alone; the merge ran."""
    import dataclasses

    from fastprompt.pack import RandomStream

    names = ["dog", "cat", "car", "bus", "owl"]
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        m = perturb(fp.create("clip_lora", tiny_clip(), names), seed).train().set_fast(fast)
        m.runtime = dataclasses.replace(m.runtime, text_chunk=2)
        models.append(m)

    def alone(m, seed):
        torch.manual_seed(100 + seed)
        out = m.encode_text(m.template)
        grads = torch.autograd.grad(out.square().sum(), list(m.text.parameters()))
        return out.detach(), grads

    solo = [alone(m, s) for m, s in zip(models, (1, 2))]
    streams = [RandomStream(torch.device("cpu")) for _ in models]
    for stream, seed in zip(streams, (1, 2)):
        with stream:
            torch.manual_seed(100 + seed)
    merged = []
    merge_rows = pack_module._merge_rows
    pack_module._merge_rows = lambda group, *a, **k: (merged.append(len(group)), merge_rows(group, *a, **k))[1]
    try:
        outs = pack_module.Pack(streams).run([lambda m=m: m.encode_text(m.template) for m in models])
    finally:
        pack_module._merge_rows = merge_rows
    assert merged == [2]
    params = [list(m.text.parameters()) for m in models]
    grads = torch.autograd.grad(sum(o.square().sum() for o in outs), params[0] + params[1])
    grads = [grads[:len(params[0])], grads[len(params[0]):]]  # disjoint parameters: each its own
    for out, own, (ref, ref_grads) in zip(outs, grads, solo):
        torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-6)
        for g, r in zip(own, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
