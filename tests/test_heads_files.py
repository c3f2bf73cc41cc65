"""The released files of Tip-Adapter(-F) and CLIP-Adapter read back (`fp.load_original`,
`python -m fastprompt.convert`), and heads exported to ONNX and served by `predict` (#24).

The files are written here the way the releases write them:
* gaopengcuhk/Tip-Adapter utils.py build_cache_model: `torch.save(cache_keys, keys_<K>shots.pt)`
  with cache_keys the normalised [NK, E] keys `.permute(1, 0)` (a strided view), and
  `torch.save(F.one_hot(labels).half(), values_<K>shots.pt)`; main.py run_tip_adapter_F:
  `torch.save(adapter.weight, best_F_<K>shots.pt)`, an nn.Parameter [NK, E];
* gaopengcuhk/CLIP-Adapter clip_adapter.py: Dassl's `clip_adapter/model.pth.tar-<epoch>` holding
  {"state_dict": the adapter's (fc.0.weight, fc.2.weight), "epoch", "optimizer", "scheduler", ...}.
"""
import json
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastprompt as fp
from common import images, tiny_clip
from fastprompt.convert import main as convert_main
from fastprompt.original import OriginalCheckpointError, OriginalCheckpointWarning

NAMES = ["banded", "dotted", "striped", "woven"]
DTD = {"dataset": "dtd", "shots": 2, "init_alpha": 2, "init_beta": 1, "search_scale": [13, 13],
       "search_step": [200, 20], "augment_epoch": 10, "lr": 0.001, "train_epoch": 20,
       "load_cache": False, "load_pre_feat": False, "search_hp": True, "root_path": ""}


def tip_source(method="tip_adapter", seed=0):
    """A model as the release leaves it: keys of 2 shots per class, dtd's prompt and alpha."""
    torch.manual_seed(seed)
    model = fp.create(method, tiny_clip(), NAMES, templates=["{} texture."], alpha=2.0, beta=1.0)
    model.build_cache(model.encode(images(8, seed=seed + 3)), torch.arange(4).repeat(2))
    if method == "tip_adapter_f":
        with torch.no_grad():
            model.cache_keys.add_(0.05 * torch.randn_like(model.cache_keys))  # tuned: not unit rows
    return model.eval()


def write_tip(folder, model, shots=2, values=None):
    folder.mkdir(parents=True, exist_ok=True)
    keys = model.cache_keys.detach().clone()
    if model.name == "tip_adapter_f":
        torch.save(nn.Parameter(keys), folder / f"best_F_{shots}shots.pt")
    torch.save(keys.permute(1, 0), folder / f"keys_{shots}shots.pt")  # a [E, NK] strided view
    onehot = F.one_hot(model.cache_labels.long()).half() if values is None else values
    torch.save(onehot, folder / f"values_{shots}shots.pt")
    return folder


def load(method, path, config=DTD, names=NAMES):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OriginalCheckpointWarning)
        model = fp.load_original(method, path, tiny_clip(), names, config=config).eval()
    return model, [str(w.message) for w in caught]


@pytest.mark.parametrize("method", ["tip_adapter", "tip_adapter_f"])
def test_release_cache_files_import_to_the_same_logits(method, tmp_path):
    src = tip_source(method)
    model, notes = load(method, write_tip(tmp_path / "caches" / "dtd", src))
    assert model.config.templates == ["{} texture."] and model.config.search_beta == 13
    assert (model.config.alpha, model.config.beta, model.config.cache_size) == (2.0, 1.0, 8)
    assert torch.equal(model.cache_keys, src.cache_keys)
    assert any("saves no searched alpha/beta" in n for n in notes)
    x = images(3, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), atol=1e-5, rtol=1e-5)
    file = "best_F_2shots.pt" if method == "tip_adapter_f" else "keys_2shots.pt"
    again, _ = load(method, tmp_path / "caches" / "dtd" / file)  # the file itself
    assert torch.equal(again.cache_keys, src.cache_keys)


def test_imagenet_config_gives_the_template_ensemble(tmp_path):
    from fastprompt.prompts import ENSEMBLE_TEMPLATES

    model, _ = load("tip_adapter", write_tip(tmp_path, tip_source()),
                    config={"dataset": "imagenet", "init_alpha": 1.17, "shots": 2})
    assert model.config.templates == list(ENSEMBLE_TEMPLATES) and model.config.alpha == 1.17
    model, notes = load("tip_adapter", tmp_path, config=None)
    assert model.config.templates == ["a photo of a {}."] and any("names no dataset" in n for n in notes)


class Exploit:
    def __reduce__(self):
        import os
        return os.system, ("touch EXPLOITED",)


@pytest.mark.parametrize("case, message", [
    ("not one-hot", "values_2shots.pt is not one-hot"),
    ("classes", "holds 4 classes but 3 class names"),
    ("shots", "says shots=2, the config says 16"),
    ("backbone", "the config says backbone 'RN50', the backbone given is tiny"),
    ("two caches", "holds keys_1shots.pt, keys_2shots.pt: give one file"),
    ("tuned file", "holds Tip-Adapter-F's tuned keys: import it as tip_adapter_f"),
    ("keys shape", r"holds a \(32, 6\) tensor, expected \[E, 8\]"),
    ("pickle", "holds Placeholder"),
    ("missing values", "missing .*values_2shots.pt"),
])
def test_release_files_that_do_not_fit_are_one_line_errors(case, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src, folder, config, names, path = tip_source(), tmp_path / "c", dict(DTD), NAMES, tmp_path / "c"
    write_tip(folder, src)
    if case == "not one-hot":
        write_tip(folder, src, values=2 * F.one_hot(src.cache_labels.long()).half())
    elif case == "classes":
        names = NAMES[:3]
    elif case == "shots":
        config["shots"] = 16
    elif case == "backbone":
        config["backbone"] = "RN50"
    elif case == "two caches":
        write_tip(folder, src, shots=1)
    elif case == "tuned file":
        write_tip(folder, tip_source("tip_adapter_f"))
        path = folder / "best_F_2shots.pt"
    elif case == "keys shape":
        torch.save(src.cache_keys.detach()[:6].t(), folder / "keys_2shots.pt")
    elif case == "pickle":
        torch.save(Exploit(), folder / "keys_2shots.pt")
    elif case == "missing values":
        (folder / "values_2shots.pt").unlink()
    with pytest.raises(OriginalCheckpointError, match=message) as err:
        load("tip_adapter", path, config=config, names=names)
    assert len(str(err.value).splitlines()) == 1
    assert not (tmp_path / "EXPLOITED").exists()


# ----------------------------------------------------------------------------------- CLIP-Adapter
def clip_adapter_source(reduction=4):
    torch.manual_seed(1)
    model = fp.create("clip_adapter", tiny_clip(), NAMES, templates=["{} texture."], reduction=reduction)
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def write_dassl(root, model, epoch=200):
    """clip_adapter.py registers `self.model.adapter` as 'clip_adapter': its state dict's keys."""
    folder = root / "clip_adapter"
    folder.mkdir(parents=True, exist_ok=True)
    sd = OrderedDict((k, v.detach().half()) for k, v in model.adapter.state_dict().items())
    torch.save({"state_dict": sd, "epoch": epoch, "optimizer": {"state": {}}, "scheduler": None,
                "val_result": None}, folder / f"model.pth.tar-{epoch}")
    return root


@pytest.mark.parametrize("reduction", [4, 8])
def test_clip_adapter_checkpoint_imports_with_its_dataset_prompt(reduction, tmp_path):
    src = clip_adapter_source(reduction)
    root = write_dassl(tmp_path / "output", src)
    config = {"DATASET": {"NAME": "DescribableTextures"}, "TRAINER": {"NAME": "CLIP_Adapter"},
              "MODEL": {"BACKBONE": {"NAME": "tiny"}}}
    model, notes = load("clip_adapter", root, config=config)
    assert not notes and model.config.templates == ["{} texture."]
    assert model.config.reduction == reduction
    x = images(3, seed=6)
    with torch.no_grad():  # fp16 weights in the file, as the release's fp16 CLIP would hold
        torch.testing.assert_close(model(x), src(x), atol=2e-3, rtol=1e-3)
    model, notes = load("clip_adapter", root, config=None)
    assert model.config.templates == ["a photo of a {}."] and "no DATASET.NAME" in notes[0]
    with pytest.raises(OriginalCheckpointError, match="'Foo' has no entry in CLIP-Adapter's"):
        load("clip_adapter", root, config={"DATASET": {"NAME": "Foo"}})


def test_convert_cli_reads_both_releases(tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(NAMES) + "\n")
    yaml = tmp_path / "dtd.yaml"
    yaml.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in DTD.items()))
    src = tip_source("tip_adapter_f")
    cache = write_tip(tmp_path / "caches" / "dtd", src)
    common = ["--model", "tiny", "--pretrained", "none", "--classnames", str(names)]
    assert convert_main(["--original", "tip_adapter_f", str(cache), *common, "--original-config",
                         str(yaml), "--out", str(tmp_path / "tip")]) == 0
    adapter = clip_adapter_source()
    root = write_dassl(tmp_path / "output", adapter)
    assert convert_main(["--original", "clip_adapter", str(root), *common, "--out", str(tmp_path / "ca")]) == 0
    assert "no DATASET.NAME" in capsys.readouterr().err
    x = images(2, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(fp.load(tmp_path / "tip").eval()(x), src(x), atol=1e-5, rtol=1e-5)
        assert fp.load(tmp_path / "ca").eval()(x).shape == (2, 4)


# ----------------------------------------------------------------------------- export and predict
def test_heads_export_to_onnx_and_predict_from_run_and_file(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    from PIL import Image

    from fastprompt import predict as predict_cli
    from fastprompt.export import __main__ as export_cli

    pic = tmp_path / "pic.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(pic)
    for src in (tip_source("tip_adapter_f"), clip_adapter_source()):
        run = fp.save(src, tmp_path / src.name)
        out = tmp_path / f"{src.name}.onnx"
        assert export_cli.main(["--run", str(run), "--format", "onnx", "--out", str(out)]) == 0
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        x = images(3, seed=9)
        with torch.no_grad():
            want = fp.load(run).classifier()(x).numpy()
        got = sess.run(None, {"images": x.numpy()})[0]
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), src.name
        capsys.readouterr()
        tops = []
        for model in (run, out):
            assert predict_cli.main(["--model", str(model), str(pic), "--json", "--topk", "2"]) == 0
            tops.append(json.loads(capsys.readouterr().out.strip())["top"])
        assert [t["class"] for t in tops[0]] == [t["class"] for t in tops[1]]
        assert tops[0][0]["prob"] == pytest.approx(tops[1][0]["prob"], abs=1e-4)
