"""The compiled Triton path inside the runner, on a real GPU (skipped without CUDA)."""
import pytest
import torch

import fastprompt as fp
from fastprompt import kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

KERNEL_METHODS = ["maple", "ivlp", "mma", "maple+lamm"]


def _loss_and_grads(model, x, y, dtype):
    model.zero_grad()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        loss = model.loss(x, y)
    loss.backward()
    return loss.detach().float(), {k: p.grad.float().clone() for k, p in model.trainable_state().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backbone", ["tiny", "ViT-B-16"])
@pytest.mark.parametrize("method", KERNEL_METHODS)
def test_triton_path_equals_plain_path_on_gpu(method, backbone, dtype):
    clip = fp.load_clip(backbone, seed=0, device="cuda")
    size = clip.image_size
    x = torch.randn(4, 3, size, size, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    y = torch.tensor([0, 1, 2, 3], device="cuda")
    names = ["dog", "cat", "sports car", "golden retriever", "red apple"]
    torch.manual_seed(0)
    fast = fp.create(method, clip, names).train()
    torch.manual_seed(0)
    plain = fp.create(method, clip, names).train().set_fast(False)
    kernels.reset_launch_counts()
    lf, gf = _loss_and_grads(fast, x, y, dtype)
    assert sum(kernels.launch_counts.values()) > 0  # the Triton kernels really ran
    lp, gp = _loss_and_grads(plain, x, y, dtype)
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(lf, lp, rtol=tol, atol=tol)
    for k in gf:
        scale = gp[k].abs().max().clamp_min(1e-8)
        assert (gf[k] - gp[k]).abs().max() / scale < (1e-3 if dtype == torch.float32 else 0.1), k


def test_classifier_on_gpu_equals_forward():
    clip = fp.load_clip("ViT-B-16", seed=0, device="cuda")
    model = fp.create("maple", clip, ["dog", "cat", "car"]).eval()
    x = torch.randn(3, 3, 224, 224, device="cuda")
    with torch.no_grad():
        assert torch.allclose(model.classifier()(x), model(x), atol=1e-3, rtol=1e-3)
