"""The compiled Triton path inside the runner, on a real GPU (skipped without CUDA)."""
import functools

import pytest
import torch

import fastprompt as fp
from fastprompt import kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

KERNEL_METHODS = ["maple", "ivlp", "mma", "maple+lamm"]


@functools.lru_cache(maxsize=None)
def cuda_clip(name: str):
    return fp.load_clip(name, pretrained=None, seed=0, device="cuda")


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
    clip = cuda_clip(backbone)
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
    lp, gp = _loss_and_grads(plain, x, y, torch.float32)  # the fp32 plain path is the truth
    if dtype == torch.float32:
        assert torch.allclose(lf, lp, rtol=2e-4, atol=2e-4)
        for k in gf:
            assert (gf[k] - gp[k]).abs().max() / gp[k].abs().max().clamp_min(1e-8) < 1e-3, k
        return
    # low precision: the fast path may be no further from fp32 than the plain path in that dtype
    lb, gb = _loss_and_grads(plain, x, y, dtype)
    assert (lf - lp).abs() <= 2 * (lb - lp).abs() + 1e-2 * lp.abs()
    for k in gf:
        err_fast, err_plain = (gf[k] - gp[k]).abs().max(), (gb[k] - gp[k]).abs().max()
        assert err_fast <= 2 * err_plain + 1e-2 * gp[k].abs().max(), k


def test_classifier_on_gpu_equals_forward():
    clip = cuda_clip("ViT-B-16")
    model = fp.create("maple", clip, ["dog", "cat", "car"]).eval()
    x = torch.randn(3, 3, 224, 224, device="cuda")
    with torch.no_grad():
        assert torch.allclose(model.classifier()(x), model(x), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("text_chunk", [0, 2], ids=["whole-text", "text-chunk-2"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["coop", "maple", "mma", "maple+lamm"])
def test_cuda_graph_step_equals_eager_step(method, precision, text_chunk):
    """The trainer's CUDA-graph step replays the eager step exactly, also with the checkpointed
    text tower (text_chunk: recomputation inside the captured backward, no RNG state read)."""
    from fastprompt.training import LossModule, TrainEnv, make_step

    clip = cuda_clip("tiny")
    torch.manual_seed(0)
    model = fp.create(method, clip, ["dog", "cat", "sports car", "golden retriever", "red apple"],
                      text_chunk=text_chunk).train()
    env = TrainEnv(device=torch.device("cuda"), precision=precision)
    graphed, eager = make_step(model, env), LossModule(model)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for seed in range(3):  # capture on the first batch, replay on new data after that
        g = torch.Generator("cuda").manual_seed(seed)
        x = torch.randn(4, 3, 32, 32, device="cuda", generator=g)
        y = torch.randint(0, 5, (4,), device="cuda", generator=g)
        results = []
        for step in (graphed, eager):
            model.zero_grad()
            with torch.autocast("cuda", dtype=dtype, enabled=precision == "bf16"):
                loss, _ = step(x, y)
            loss.backward()
            results.append((loss.detach(), {k: p.grad.clone() for k, p in model.trainable_state().items()}))
        assert graphed.graphed is not None and not graphed.failed
        (lg, gg), (le, ge) = results
        assert torch.allclose(lg, le, rtol=1e-5, atol=1e-6)
        for k in gg:
            assert torch.allclose(gg[k], ge[k], rtol=1e-4, atol=1e-7), k
