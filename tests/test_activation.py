"""The backbone's MLP activation follows its weights (QuickGELU for OpenAI's CLIP), without downloads.

OpenAI's weights are stood in for by a random ViT-B/16 (fp16 values, as OpenAI's release) written
where open_clip looks for them: a Hugging Face cache (`--pretrained openai`; the CLI runs with
HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing there), OpenAI's TorchScript release format, and plain
state dicts. The reference is open_clip's own `ViT-B-16-quickgelu` model with the same weights,
computing logits with its own `encode_image` / `encode_text`.
"""
import os
import subprocess
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastprompt as fp
from fastprompt.activation import ActivationWarning
from fastprompt.checkpoint import CheckpointError

from test_train import PET_CLASSES, write_oxford_pets

OPENAI_HF_REPO = "timm/vit_base_patch16_clip_224.openai"  # open_clip's source of the openai tag
NAMES = ["cat", "golden retriever", "sports car"]


@pytest.fixture(scope="module")
def openai_like(tmp_path_factory):
    """{'state': fp32 state dict of fp16 values, 'dir': tmp folder, 'hub': an HF cache holding it}."""
    torch.manual_seed(123)
    model = open_clip.create_model("ViT-B-16-quickgelu")
    state = {k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    root = tmp_path_factory.mktemp("openai")
    snapshot = root / "hub" / f"models--{OPENAI_HF_REPO.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()},
               snapshot / "open_clip_pytorch_model.bin")
    return {"state": state, "dir": root, "hub": root / "hub",
            "file": snapshot / "open_clip_pytorch_model.bin"}


@pytest.fixture
def redirect_download(monkeypatch, openai_like):
    """open_clip's download of a pretrained tag returns the local OpenAI-layout file, which the
    Hugging Face cache holds (so fastprompt's offline check finds the tag cached)."""
    import huggingface_hub.constants  # a submodule: the package imports it lazily

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(openai_like["hub"]))
    monkeypatch.setattr(open_clip.factory, "download_pretrained",
                        lambda cfg, *a, **k: str(openai_like["file"]))


def reference_logits(state, images, prompts):
    """open_clip's own QuickGELU ViT-B/16 with `state`: 100 * cos(image, text)."""
    model = open_clip.create_model("ViT-B-16-quickgelu")
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(open_clip.get_tokenizer("ViT-B-16")(prompts)), dim=-1)
        return model.logit_scale.exp() * img @ txt.t()


def zero_shot_logits(clip, images, names=NAMES):
    model = fp.create("zeroshot", clip, names).eval()
    with torch.no_grad():
        return model(images)


def test_openai_tag_builds_quick_gelu_and_matches_open_clip(openai_like, redirect_download):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    clip = fp.load_clip("ViT-B-16", pretrained="openai")
    assert clip.quick_gelu and clip.source["quick_gelu"] is True
    ours = zero_shot_logits(clip, x)
    ref = reference_logits(openai_like["state"], x, [f"a photo of a {n}." for n in NAMES])
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    gelu = fp.load_clip("ViT-B-16", pretrained=str(openai_like["file"]), quick_gelu=False)
    assert (zero_shot_logits(gelu, x) - ref).abs().max() > 1e-3  # the activation matters here


def test_openai_torchscript_release_is_read_as_quick_gelu(openai_like):
    """OpenAI's released model.pt is a TorchScript archive (fp16, with three extra entries)."""
    root = nn.Module()
    extra = {"input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
             "vocab_size": torch.tensor(49408)}
    for key, value in {**openai_like["state"], **extra}.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.register_buffer(leaf, value.half() if value.is_floating_point() else value)
    file = openai_like["dir"] / "ViT-B-16.pt"
    torch.jit.script(root).save(str(file))
    clip = fp.load_clip("ViT-B-16", pretrained=str(file))
    assert clip.quick_gelu
    sd = clip.model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in openai_like["state"].items())


def test_plain_state_dict_gelu_unless_told(openai_like, tmp_path):
    with pytest.warns(ActivationWarning, match="quick_gelu=True"):
        assert not fp.load_clip("ViT-B-16", pretrained=str(openai_like["file"])).quick_gelu
    assert fp.load_clip("ViT-B-16", pretrained=str(openai_like["file"]), quick_gelu=True).quick_gelu
    assert fp.load_clip("ViT-B-16-quickgelu", pretrained=str(openai_like["file"])).quick_gelu
    marked = tmp_path / "openai_state.pt"  # a state dict that kept the release's extra entries
    torch.save({**openai_like["state"], "input_resolution": torch.tensor(224)}, marked)
    assert fp.load_clip("ViT-B-16", pretrained=str(marked)).quick_gelu
    assert not fp.load_clip("ViT-B-16", pretrained=None).quick_gelu  # random init: the config's GELU
    with pytest.raises(fp.clip.BackboneError, match="QuickGELU variant"):
        fp.load_clip("ViT-B-16-quickgelu", quick_gelu=False)


def test_saved_run_rebuilds_the_same_activation_and_weights(openai_like, redirect_download, tmp_path,
                                                            monkeypatch):
    x = torch.randn(1, 3, 224, 224)
    clip = fp.load_clip("ViT-B-16", pretrained="openai")
    model = fp.create("zeroshot", clip, NAMES).eval()
    fp.save(model, tmp_path / "run")
    again = fp.load(tmp_path / "run").eval()
    assert again.clip.quick_gelu
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)
    # the weights behind the tag changed: the run refuses them instead of computing silently
    other = {k: v + 0.01 if v.is_floating_point() else v for k, v in openai_like["state"].items()}
    torch.save(other, tmp_path / "other.bin")
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda *a, **k: str(tmp_path / "other.bin"))
    with pytest.raises(CheckpointError, match="differ from those"):
        fp.load(tmp_path / "run")


def test_relative_checkpoint_path_is_recorded_absolute(tmp_path, monkeypatch):
    clip = fp.load_clip("tiny", pretrained=None, seed=0)
    torch.save(clip.model.state_dict(), tmp_path / "w.pt")
    monkeypatch.chdir(tmp_path)
    model = fp.create("zeroshot", fp.load_clip("tiny", pretrained="w.pt"), NAMES)
    assert model.clip.source["pretrained"] == str(tmp_path / "w.pt")
    fp.save(model, tmp_path / "run")
    monkeypatch.chdir("/")
    assert fp.load(tmp_path / "run").clip.pretrained == str(tmp_path / "w.pt")


def test_cli_zero_shot_with_openai_tag_equals_open_clip(openai_like, redirect_download, tmp_path):
    """The user's path: `--pretrained openai` through the CLI (download served from the HF cache),
    then `fp.load` of its run directory; OxfordPets gets CoOp's pet template."""
    root = write_oxford_pets(tmp_path / "data", per_class=1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(openai_like["hub"])}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastprompt.train", "--method", "zeroshot", "--model", "ViT-B-16",
           "--pretrained", "openai", "--dataset", "oxford_pets", "--data-root", str(root),
           "--shots", "1", "--device", "cpu", "--no-progress", "--out", str(run)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    model = fp.load(run).eval()
    assert model.clip.quick_gelu
    names = PET_CLASSES[:3]  # the base half
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.classifier()(x)
    prompts = [f"a photo of a {n.replace('_', ' ')}, a type of pet." for n in names]
    torch.testing.assert_close(ours, reference_logits(openai_like["state"], x, prompts), atol=1e-4, rtol=0)
