"""The released code's schedule, few-shot draw, zero-shot prompts and recipes, on the CLI's own path.

Each reference is written here from the original code, independently of fastprompt's helpers:
Dassl's scheduler from torch's own CosineAnnealingLR, Dassl's few-shot draw from the global
`random` module, CoOp's zero-shot prompts as strings.
"""
import json
import random
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

import fastprompt as fp
from fastprompt.recipes import recipe_for
from fastprompt.train import main

from common import tiny_clip


def dassl_lrs(lr: float, epochs: int, warmup: int) -> list[float]:
    """Dassl's ConstantWarmupScheduler(CosineAnnealingLR(T_max=epochs), warmup, 1e-5), stepped
    once after each epoch (dassl/optim/lr_scheduler.py, the trainers' update_lr): during the warm-up
    the constant; afterwards the successor, stepped once per epoch after the warm-up."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    successor = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=float(epochs))
    out = []
    for epoch in range(epochs):
        if epoch < warmup:
            out.append(1e-5)
        else:
            out.append(opt.param_groups[0]["lr"])
            successor.step()
    return out


@pytest.mark.parametrize("method", ["coop", "cocoop", "maple", "ivlp", "mma", "lamm", "maple+lamm"])
def test_every_recipe_follows_dassls_schedule(method):
    r = recipe_for(method)
    assert [r.lr_at(e) for e in range(r.epochs)] == pytest.approx(
        dassl_lrs(r.lr, r.epochs, r.warmup_epochs), rel=1e-12, abs=1e-15)


def test_pinned_schedules_of_the_released_configs():
    """MaPLe (vit_b16_c2_ep5_batch4_2ctx.yaml: lr 0.0035, 5 epochs, 1 warm-up epoch at 1e-5) and
    MMA (vit_b16_ep5.yaml: lr 0.0015, 5 epochs, WARMUP_EPOCH 0), values of Dassl's scheduler."""
    maple = recipe_for("maple")
    assert [maple.lr_at(e) for e in range(5)] == pytest.approx(
        [1e-5, 0.0035, 0.00316578, 0.00229078, 0.00120922], rel=1e-5)
    mma = recipe_for("mma")
    assert [mma.lr_at(e) for e in range(5)] == pytest.approx(
        [0.0015, 0.00135676, 0.000981763, 0.000518237, 0.000143237], rel=1e-5)
    cocoop = recipe_for("cocoop")
    assert cocoop.lr_at(1) == 0.002 and cocoop.lr_at(9) == pytest.approx(0.000190983, rel=1e-5)


def test_cli_logs_dassls_lr_for_maple(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--method", "maple", "--dataset", "builtin", "--shots", "2", "--no-progress",
                 "--out", str(out)]) == 0
    logged = [json.loads(line)["lr"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert logged == pytest.approx(dassl_lrs(0.0035, 5, 1), rel=1e-12)


def test_cross_dataset_recipe_by_name_and_by_protocol(tmp_path, capsys):
    """MaPLe's xd recipe (vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml: lr 0.0026, 2 epochs,
    PROMPT_DEPTH 3) by --recipe cross; picked by itself for all of ImageNet."""
    out = tmp_path / "run"
    assert main(["--method", "maple", "--dataset", "builtin", "--shots", "2", "--recipe", "cross",
                 "--subsample", "all", "--no-progress", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["options"]["depth"] == 3
    assert (config["run"]["recipe"]["lr"], config["run"]["recipe"]["epochs"]) == (0.0026, 2)
    from fastprompt.recipes import default_protocol
    assert default_protocol("imagenet", "all") == "cross"
    assert default_protocol("imagenet", "base") == default_protocol("oxford_pets", "base") == "base2novel"
    assert default_protocol("oxford_pets", "all") == default_protocol("folder", "all") == "fewshot"
    assert recipe_for("coop", "imagenet").epochs == 50 and recipe_for("mma", "imagenet").batch_size == 128


# ---------------------------------------------------------------- few-shot images

PETS = ["sphynx", "abyssinian", "beagle", "boxer", "pug"]  # labels deliberately out of order


def write_pets(root):
    """CoOp layout; the split file lists labels out of order and one class has 2 val images."""
    from PIL import Image

    d = root / "oxford_pets"
    (d / "images").mkdir(parents=True)
    split = {"train": [], "val": [], "test": []}
    order = [3, 0, 4, 1, 2]
    for part, n in (("train", 20), ("val", 6), ("test", 2)):
        for i in range(n):
            for y in order:
                if part == "val" and y == 4 and i >= 2:
                    continue  # a class with fewer than min(K, 4) val images
                name = f"{PETS[y]}_{part}_{i}.jpg"
                Image.new("RGB", (8, 8), (y * 40, i * 10 % 255, 7)).save(d / "images" / name)
                split[part].append([name, y, PETS[y]])
    (d / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    return root, split


def dassl_few_shot(split: dict, shots: int, seed: int) -> dict:
    """CoOp datasets/oxford_pets.py + dassl base_dataset.generate_fewshot_dataset, with dassl's
    set_random_seed first: random.sample per label in order of first appearance; all items of a
    label that has fewer than K (repeat=False, nothing drawn)."""
    random.seed(seed)

    def draw(items, k):
        tracker = defaultdict(list)
        for item in items:
            tracker[item[1]].append(item)
        picked = []
        for group in tracker.values():
            picked.extend(random.sample(group, k) if len(group) >= k else group)
        return picked
    train = draw(split["train"], shots)
    return {"train": train, "val": draw(split["val"], min(shots, 4))}


@pytest.mark.parametrize("seed", [1, 3])
def test_split_json_holds_dassls_few_shot_images(tmp_path, capsys, seed):
    root, split = write_pets(tmp_path / "data")
    want = dassl_few_shot(split, shots=4, seed=seed)
    out = tmp_path / "run"
    assert main(["--method", "zeroshot", "--dataset", "oxford_pets", "--data-root", str(root),
                 "--shots", "4", "--seed", str(seed), "--subsample", "all", "--out", str(out)]) == 0
    got = json.loads((out / "split.json").read_text())
    for part in ("train", "val"):
        assert [(p.split("/")[-1], y) for p, y, _ in got[part]] == [(p, y) for p, y, _ in want[part]]
    # base-to-novel: the same draw over all classes, then the base half (labels 0..2) relabelled
    out = tmp_path / "base"
    assert main(["--method", "zeroshot", "--dataset", "oxford_pets", "--data-root", str(root),
                 "--shots", "4", "--seed", str(seed), "--out", str(out)]) == 0
    got = json.loads((out / "split.json").read_text())["train"]
    assert [(p.split("/")[-1], y) for p, y, _ in got] == [(p, y) for p, y, _ in want["train"] if y < 3]


# ---------------------------------------------------------------- zero-shot prompts

def test_zero_shot_uses_coops_dataset_template(tmp_path, capsys):
    root, _ = write_pets(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["--method", "zeroshot", "--dataset", "oxford_pets", "--data-root", str(root),
                 "--shots", "1", "--out", str(out)]) == 0
    model = fp.load(out)
    assert model.config.templates == ["a photo of a {}, a type of pet."]
    want = model.clip.tokenize([f"a photo of a {n}, a type of pet." for n in model.classnames])
    assert torch.equal(model.template.tokens.cpu(), want)
    assert main(["--method", "coop", "--template", "{} texture.", "--dataset", "builtin",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--template" in capsys.readouterr().err


@pytest.mark.parametrize("fmt, names", [("{} texture.", ["banded", "red apple"]),
                                        ("a centered satellite photo of {}.", ["Sea or Lake", "Forest"]),
                                        ("a photo of {}, a type of food.", ["apple_pie", "ramen"])])
def test_templates_with_text_after_the_name(fmt, names):
    clip = tiny_clip()
    model = fp.create("zeroshot", clip, names, templates=[fmt]).eval()
    texts = [fmt.format(n.replace("_", " ")) for n in names]
    tok = clip.tokenize(texts)
    with torch.no_grad():
        ref = F.normalize(clip.model.encode_text(tok), dim=-1)
        torch.testing.assert_close(model.text_features(), ref, atol=1e-5, rtol=0)
    before = fmt.split("{}")[0].strip()
    assert model.template.name_start == 1 + (len(clip.tokenize([before])[0].nonzero()) - 2 if before else 0)


def test_prompt_ensemble_is_zeroshotclip2():
    """CoOp trainers/zsclip.py ZeroshotCLIP2: mean of the per-template normalised features, normalised."""
    clip, names = tiny_clip(), ["dog", "cat"]
    from fastprompt.recipes import zero_shot_templates
    templates = zero_shot_templates("oxford_pets", ensemble=True)
    assert len(templates) == 8 and templates[0] == "itap of a {}." and templates[-1].endswith("type of pet.")
    assert len(zero_shot_templates("imagenet", ensemble=True)) == 7
    model = fp.create("zeroshot", clip, names, templates=templates).eval()
    with torch.no_grad():
        per = [F.normalize(clip.model.encode_text(clip.tokenize([t.format(n) for n in names])), dim=-1)
               for t in templates]
        ref = F.normalize(torch.stack(per).sum(0) / len(per), dim=-1)
        torch.testing.assert_close(model.text_features(), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.classifier().text_features, ref, atol=1e-5, rtol=0)
