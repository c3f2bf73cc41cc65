"""The runner against open_clip itself, and the exact text shortcut."""
import pytest
import torch

import fastprompt as fp
from fastprompt.backbone import Backbone, RunOptions
from fastprompt.clip import BackboneError

from common import images, tiny_clip

SENTENCES = ["a photo of a dog.", "a photo of a very big cat sitting in the garden at night.", "x"]


def test_image_tower_matches_open_clip():
    clip = tiny_clip()
    x = images(4)
    ref = clip.model.encode_image(x)
    ours = Backbone(clip).encode_image(x)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("truncate", [True, False])
def test_text_tower_matches_open_clip(truncate):
    clip = tiny_clip()
    bb = Backbone(clip)
    tok = clip.tokenize(SENTENCES)
    ref = clip.model.encode_text(tok)
    ours = bb.encode_text(bb.token_embeddings(tok), bb.eot_index(tok),
                          opts=RunOptions(truncate_text=truncate))
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)


def test_truncation_runs_fewer_tokens_with_identical_result():
    clip = tiny_clip()
    bb = Backbone(clip)
    tok = clip.tokenize(SENTENCES)
    eot = bb.eot_index(tok)
    assert bb.text_length(eot, 77, RunOptions(truncate_text=True)) == int(eot.max()) + 1 < 77
    assert bb.text_length(eot, 77, RunOptions(truncate_text=False)) == 77
    emb = bb.token_embeddings(tok)
    a = bb.encode_text(emb, eot, opts=RunOptions(truncate_text=True))
    b = bb.encode_text(emb, eot, opts=RunOptions(truncate_text=False))
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_vit_b16_runner_matches_open_clip():
    clip = fp.load_clip("ViT-B-16", pretrained=None, seed=3)
    bb = Backbone(clip)
    x = torch.randn(1, 3, 224, 224)
    assert torch.allclose(bb.encode_image(x), clip.model.encode_image(x), atol=1e-5, rtol=0)
    tok = clip.tokenize(SENTENCES[:2])
    ours = bb.encode_text(bb.token_embeddings(tok), bb.eot_index(tok))
    assert torch.allclose(ours, clip.model.encode_text(tok), atol=1e-5, rtol=0)


def test_random_init_is_reproducible_from_seed():
    a, b, c = (fp.load_clip("tiny", pretrained=None, seed=s) for s in (1, 1, 2))
    wa, wb, wc = (m.model.visual.proj for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_backbone_is_frozen():
    clip = tiny_clip()
    assert not any(p.requires_grad for p in clip.model.parameters())


@pytest.mark.parametrize("name, message", [
    ("RN50", "only ViT image towers"),
    ("no-such-model", "unknown model"),
])
def test_unsupported_backbones_are_refused(name, message):
    with pytest.raises(BackboneError, match=message):
        fp.load_clip(name)


def test_missing_checkpoint_file_is_refused(tmp_path):
    with pytest.raises(BackboneError, match="not found"):
        fp.load_clip("tiny", pretrained=str(tmp_path / "nope.safetensors"))
    with pytest.raises(BackboneError, match="unknown pretrained tag"):
        fp.load_clip("ViT-B-16", pretrained="no_such_tag")


def test_autocast_bf16_runs_without_hard_coded_half():
    clip = tiny_clip()
    bb = Backbone(clip)
    x = images(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bb.encode_image(x)
    ref = bb.encode_image(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, atol=0.1, rtol=0.05)
