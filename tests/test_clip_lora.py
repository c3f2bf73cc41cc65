"""CLIP-LoRA beyond the shared matrix: its recipe and schedule on the CLI's own path, merged
inference (equal to the unmerged model, plain CLIP's cost, the ONNX export), the dropout masks
under the runtime switches, the released file format in and out, and bad options."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import fastprompt as fp
from fastprompt.original import OriginalCheckpointError, load_original, save_original
from fastprompt.recipes import PROTOCOLS, recipe_for
from fastprompt.train import main as train_main

from common import CLASSNAMES, images, killed_in_epoch, perturb, tiny_clip


def make(seed=0, **options):
    torch.manual_seed(seed)
    return perturb(fp.create("clip_lora", tiny_clip(), CLASSNAMES, **options), seed=seed, std=0.2)


# ------------------------------------------------------------------------- recipe and schedule
def test_the_released_recipe_in_every_protocol():
    """run_utils.py / lora.py run_lora: AdamW(lr 2e-4, betas (0.9, 0.999), eps 1e-8, wd 1e-2),
    CosineAnnealingLR(T_max = n_iters * shots, eta_min 1e-6) stepped every iteration, no warm-up,
    batch 32, n_iters 500, RandomResizedCrop scale (0.08, 1) (main.py; imagenet.py's as well)."""
    for protocol in PROTOCOLS:
        for dataset in ("dtd", "imagenet"):
            r = recipe_for("clip_lora", dataset, protocol, shots=4)
            assert (r.batch_size, r.lr, r.optimizer, r.betas, r.eps, r.weight_decay) == \
                (32, 2e-4, "adamw", (0.9, 0.999), 1e-8, 0.01), (protocol, dataset)
            assert (r.schedule, r.min_lr, r.warmup_epochs, r.crop_scale) == ("iteration", 1e-6, 0, (0.08, 1.0))
            assert r.total_steps(steps_per_epoch=3) == 2000 and r.total_epochs(3) == 667
    # --epochs replaces the step budget (and --epochs 0 trains nothing)
    assert recipe_for("clip_lora", epochs=2).total_steps(3) == 6
    assert not recipe_for("clip_lora", epochs=0).trains
    assert recipe_for("clip_lora", epochs=2, iterations_per_shot=3, shots=1).total_steps(5) == 3


def test_cli_run_follows_the_release_schedule_per_iteration(tmp_path, capsys):
    """A CLI run (builtin shapes, 10 classes, 1 shot, batch 4: 2 steps an epoch) with a budget of
    7 steps: the rate of every step, read from log.jsonl, is torch's CosineAnnealingLR(T_max=7,
    eta_min=1e-6) over AdamW at 2e-4, stepped after each step as run_lora does, across epochs."""
    conf = tmp_path / "recipe.json"
    conf.write_text(json.dumps({"iterations_per_shot": 7}))
    out = tmp_path / "run"
    assert train_main(["--method", "clip_lora", "--dataset", "builtin", "--shots", "1", "--subsample",
                       "all", "--batch-size", "4", "--config", str(conf), "--no-progress",
                       "--zero-shot-ref", "never", "--out", str(out)]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-4, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7, eta_min=1e-6)
    want = []
    for _ in range(7):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [len(e["lrs"]) for e in log] == [2, 2, 2, 1]
    assert [lr for e in log for lr in e["lrs"]] == pytest.approx(want, rel=1e-12, abs=0)
    recipe = json.loads((out / "config.json").read_text())["run"]["recipe"]
    assert (recipe["optimizer"], recipe["weight_decay"], recipe["schedule"]) == ("adamw", 0.01, "iteration")
    assert "acc" in json.loads((out / "metrics.json").read_text())


def test_a_resumed_run_draws_the_same_masks(tmp_path, monkeypatch):
    """Dropout draws come from the per-epoch seeded RNG: a run killed in its third epoch and
    resumed ends with the tensors and AdamW state of the uninterrupted run, bit for bit."""
    from PIL import Image
    from safetensors.torch import load_file

    from fastprompt.data import Datum
    from fastprompt.training import TrainEnv, train

    g = torch.Generator().manual_seed(0)
    items = [Datum(None, i % 2, CLASSNAMES[i % 2], image=Image.fromarray(
        (torch.rand(36, 36, 3, generator=g) * 255).to(torch.uint8).numpy())) for i in range(8)]
    recipe = recipe_for("clip_lora", batch_size=4, shots=1, iterations_per_shot=7)  # 4 epochs
    env = TrainEnv(device=torch.device("cpu"), seed=1, progress=False)

    def model():
        torch.manual_seed(1)
        return fp.create("clip_lora", tiny_clip(), CLASSNAMES[:2])
    train(model(), recipe, items, tmp_path / "whole", env, log=lambda *_: None)
    with killed_in_epoch(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        train(model(), recipe, items, tmp_path / "part", env, log=lambda *_: None)
    train(model(), recipe, items, tmp_path / "part", env, resume=True, log=lambda *_: None)
    a, b = (load_file(str(tmp_path / d / "checkpoint.safetensors")) for d in ("whole", "part"))
    assert a.keys() == b.keys() and any(k.startswith("optim/") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------- merged inference
def test_merged_equals_unmerged_and_costs_what_plain_clip_costs():
    """Eval and the classifier run copies of the weights with s·B@A added: equal to the unmerged
    training forward within fp32 rounding, the same FLOPs as zero-shot CLIP's classifier, and the
    classifier holds no LoRA tensor (only the merged weights, as buffers)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = make(params="qkvo", dropout=0.0)
    x = images(4)
    with torch.no_grad():
        unmerged = model.train()(x)
        merged = model.eval()(x)
        clf = model.train().classifier()  # merged whatever the mode
        assert model.training
        assert (merged - unmerged).abs().max() < 1e-4 and torch.equal(clf(x), merged)
    attn = model.backbone.visual.transformer.resblocks[3].attn
    lr = model.vision["3"]
    q_rows = attn.in_proj_weight[:48] + lr.q.B @ lr.q.A * model.scale
    torch.testing.assert_close(clf.image_in_proj_3[:48], q_rows)
    torch.testing.assert_close(clf.image_out_proj_3, attn.out_proj.weight + lr.o.B @ lr.o.A * model.scale)
    trainable = {p.data_ptr() for p in model.trainable_state().values()}
    assert not any(t.data_ptr() in trainable for t in list(clf.buffers()) + list(clf.parameters()))
    plain = fp.create("zeroshot", tiny_clip(), CLASSNAMES).classifier()
    flops = []
    for c in (clf, plain):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            c(x)
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1] > 0


def test_onnx_export_is_merged_and_equals_torch(tmp_path, capsys):
    """`python -m fastprompt.export` on a run: the graph holds the merged weights (no [r, d]
    tensor), onnxruntime equals the torch classifier and the unmerged model, its fp16 rewrite (what
    a TensorRT engine is built from) passes the precision check; predict reads it."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from fastprompt import predict as predict_cli
    from fastprompt.export import __main__ as export_cli

    model = make(seed=3, dropout=0.0).eval()
    run = fp.save(model, tmp_path / "run")
    out = tmp_path / "lora.onnx"
    assert export_cli.main(["--run", str(run), "--format", "onnx", "--out", str(out)]) == 0
    proto = onnx.load(str(out))
    assert not any(2 in t.dims for t in proto.graph.initializer if len(t.dims) == 2)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = images(3, seed=5)
    got = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, model.classifier()(x), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(got, model.train()(x), atol=2e-4, rtol=1e-5)
    # the graph TensorRT's fp16 engine is built from (export/fp16.py): checked and close
    from fastprompt.export import fp16 as fp_fp16
    from fastprompt.export import tensorrt as fp_trt
    mixed = fp_fp16.to_mixed_fp16(proto)
    assert fp_fp16.check_precision(mixed, fp16=True)["fp32_norms"] == 26
    half = ort.InferenceSession(mixed.SerializeToString(), providers=["CPUExecutionProvider"])
    got16 = torch.from_numpy(half.run(None, {"images": x.numpy()})[0])
    assert (got16 - got).abs().max() / got.abs().max() < fp_trt.FP16_MAX_REL_ERR / 3
    from PIL import Image
    pixels = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    capsys.readouterr()
    assert predict_cli.main(["--model", str(out), str(tmp_path / "a.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["top"][0]["class"] in CLASSNAMES


# ------------------------------------------------------------------------- dropout masks
def loss_and_grads(model, seed=11):
    x, y = images(3, seed=2), torch.tensor([0, 1, 4])
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model.loss(x, y)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.trainable_state().items()}


@pytest.mark.parametrize("switch", [{"truncate_text": False}, {"text_chunk": 2}, {"kernels": False}])
def test_dropout_masks_do_not_depend_on_the_runtime_switches(switch):
    """The same masks with the text shortcut off, the text tower in checkpointed chunks (its
    recomputation included) or the release-style branch: the same loss and gradients."""
    ref = loss_and_grads(make(params="qkvo", dropout=0.25).train())
    other = make(params="qkvo", dropout=0.25)
    other.runtime = type(other.runtime)(**{**vars(other.runtime), **switch})
    got = loss_and_grads(other.train())
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    for k, g in ref[1].items():  # per tensor, as the shared matrix measures it
        assert (got[1][k] - g).abs().max() / g.abs().max() < 1e-4, k


def test_no_dropout_and_no_random_draw_in_eval():
    model = make(dropout=0.25).eval()
    state = torch.get_rng_state()
    with torch.no_grad():
        a, b = model(images(2)), model(images(2))
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------------- the released file
def test_lora_weights_file_round_trip_and_release_layout(tmp_path):
    """save_original writes what save_lora writes (nested weights, text blocks first, metadata
    of run_utils.py's types); load_original reads it back to the same model."""
    from fastprompt.original.unpickle import safe_load

    model = make(encoder="vision", position="half-up", params="qv", r=3, alpha=2.0)
    path = save_original(model, tmp_path / "out")
    assert path.name == "lora_weights.pt"
    raw = safe_load(path)
    assert raw["metadata"] == {"r": 3, "alpha": 2, "encoder": "vision", "params": ["q", "v"],
                               "position": "half-up"}
    assert sorted(raw["weights"]) == sorted(f"layer_{k}" for k in range(6))
    assert sorted(raw["weights"]["layer_0"]) == ["q_proj", "v_proj"]
    torch.testing.assert_close(raw["weights"]["layer_0"]["v_proj"]["w_lora_B"], model.vision["6"].v.B.detach())
    again = load_original("clip_lora", tmp_path / "out", tiny_clip(), CLASSNAMES)
    x = images(2)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model.eval()(x))
    sd = fp.original_state_dict(again)  # the file's keys, flattened; the model's own tensors
    assert sd["layer_5.q_proj.w_lora_A"] is again.vision["11"].q.A and len(sd) == 6 * 2 * 2


def test_lora_weights_written_by_hand_text_first(tmp_path):
    """A file laid out as save_lora lays it out, written here: layer_0..11 the text blocks,
    layer_12..23 the vision blocks, 'proj' for o."""
    src = make(params="qkvo")
    weights = {}
    for k, (tower, i) in enumerate([("text", i) for i in range(12)] + [("vision", i) for i in range(12)]):
        blocks = getattr(src, tower)[str(i)]
        weights[f"layer_{k}"] = {
            name: {"w_lora_A": blocks[p].A.detach().clone(), "w_lora_B": blocks[p].B.detach().clone()}
            for p, name in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "proj"))}
    torch.save({"weights": weights, "metadata": {"r": 2, "alpha": 1, "encoder": "both",
                                                 "params": ["q", "k", "v", "o"], "position": "all"}},
               tmp_path / "lora_weights.pt")
    model = load_original("clip_lora", tmp_path / "lora_weights.pt", tiny_clip(), CLASSNAMES)
    for name, p in src.trainable_state().items():
        assert torch.equal(model.get_parameter(name), p), name


def refused(match, path, config=None, clip=None):
    with pytest.raises(OriginalCheckpointError, match=match) as err:
        load_original("clip_lora", path, clip or tiny_clip(), CLASSNAMES, config=config)
    assert "\n" not in str(err.value)


def test_refusals(tmp_path):
    model = make()
    good = save_original(model, tmp_path / "good")
    raw = torch.load(good, weights_only=True)  # written by this test itself
    no_meta = tmp_path / "no_meta" / "lora_weights.pt"
    no_meta.parent.mkdir()
    torch.save({"weights": raw["weights"]}, no_meta)
    refused("metadata lacks r, alpha, encoder, params, position", no_meta)
    assert load_original("clip_lora", no_meta, tiny_clip(), CLASSNAMES, config=raw["metadata"])
    other = {**raw, "weights": {**raw["weights"], "layer_3": {
        **raw["weights"]["layer_3"],
        "k_proj": {"w_lora_A": torch.zeros(2, 64), "w_lora_B": torch.zeros(64, 2)}}}}
    torch.save(other, tmp_path / "other.pt")
    refused(r"'layer_3.k_proj.w_lora_A' has shape \(2, 64\), expected \(2, 32\)", tmp_path / "other.pt")
    torch.save({**raw, "metadata": {**raw["metadata"], "position": "half-up"}}, tmp_path / "pos.pt")
    refused(r"'layer_12.k_proj.w_lora_A' is unknown to CLIP-LoRA as imported \(encoder=both, "
            r"position=half-up", tmp_path / "pos.pt")
    torch.save({**raw, "metadata": {**raw["metadata"], "r": 4}}, tmp_path / "r.pt")
    refused(r"'layer_0.k_proj.w_lora_A' has rank 2, the metadata \(or the config\) says r=4", tmp_path / "r.pt")
    torch.save({"state_dict": {"ctx": torch.zeros(4, 32)}, "epoch": 1}, tmp_path / "coop.pth.tar-1")
    refused("holds no 'weights'", tmp_path / "coop.pth.tar-1")
    torch.save({**raw, "metadata": {**raw["metadata"], "params": "qkv"}}, tmp_path / "meta.pt")
    refused("metadata 'params' is 'qkv'", tmp_path / "meta.pt")
    (tmp_path / "two" / "a").mkdir(parents=True)
    (tmp_path / "two" / "b").mkdir()
    for d in ("a", "b"):
        torch.save(raw, tmp_path / "two" / d / "lora_weights.pt")
    refused("2 lora_weights.pt under", tmp_path / "two")
    (tmp_path / "empty").mkdir()
    refused("no lora_weights.pt under", tmp_path / "empty")


def test_convert_cli_writes_a_run(tmp_path, capsys):
    from fastprompt.convert import main as convert_main

    model = make(seed=4)
    save_original(model, tmp_path / "save" / "vitb16" / "dtd" / "16shots" / "seed1")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(CLASSNAMES))
    assert convert_main(["--original", "clip_lora", str(tmp_path / "save"), "--model", "tiny",
                         "--pretrained", "none", "--classnames", str(names),
                         "--out", str(tmp_path / "run")]) == 0
    again = fp.load(tmp_path / "run", clip=tiny_clip())
    with torch.no_grad():
        assert torch.equal(again.eval()(images(2)), model.eval()(images(2)))


@pytest.mark.parametrize("options, message", [
    ({"params": "qx"}, "params='qx'"), ({"params": "qq"}, "params='qq'"), ({"position": "left"}, "position="),
    ({"r": 0}, "r=0"), ({"dropout": 1.0}, "dropout=1.0"), ({"encoder": "audio"}, "encoder"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        fp.create("clip_lora", tiny_clip(), CLASSNAMES, **options)


def test_scale_is_alpha_over_sqrt_r():
    assert make(r=4, alpha=3.0).scale == pytest.approx(3 / math.sqrt(4))
