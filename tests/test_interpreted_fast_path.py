"""The fast path as users run it, on the CPU: Triton forced (`fastprompt.kernels.use("triton")`,
the same switch as FASTPROMPT_KERNELS=triton) and executed by Triton's interpreter
(TRITON_INTERPRET=1, tests/conftest.py) inside whole tiny models, for every method that launches
kernels — the CPU twin of test_gpu.py's tiny/fp32 cases. The backbone is the tiny CLIP with its
shipped weights (the train CLI's default), whose LayerNorms are not the identity of a random init.
Judged against the plain path (kernels, text truncation and caches off) at fp32 tolerances; a
launch counter proves the kernels ran."""
import functools

import pytest
import torch

import fastprompt as fp
from fastprompt import kernels

from common import CLASSNAMES, grads, images, perturb

pytestmark = pytest.mark.skipif(
    not kernels.dispatch.interpret_mode(),
    reason="runs Triton's CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py where there is "
           "no CUDA); on a GPU, test_gpu.py covers the compiled kernels")

PROMPT_KERNELS = {"insert_layernorm_fwd", "insert_layernorm_bwd"}
ADAPTER_KERNELS = {"adapter_residual_fwd", "adapter_residual_bwd_rows", "adapter_residual_bwd_weights"}
#: method -> (options, the kernels its training step must launch). Fewer prompt / adapter layers
#: than the defaults: each interpreted launch costs ~0.35 s here (2-core EPYC VM), and every
#: layer runs the same kernels (depth 3 still has a shallow and two deep prompt layers per tower).
KERNEL_METHODS = {
    "maple": ({"depth": 3}, PROMPT_KERNELS),
    "ivlp": ({"depth": 3}, PROMPT_KERNELS),
    "mma": ({"start": 11, "end": 12}, ADAPTER_KERNELS),
    "maple+lamm": ({"depth": 3}, PROMPT_KERNELS),
}


@functools.lru_cache(maxsize=None)
def shapes_clip():
    return fp.load_clip("tiny", pretrained="shapes")


def loss_and_grads(model, x, y):
    model.zero_grad()
    loss = model.loss(x, y)
    loss.backward()
    return loss.detach(), grads(model)


@pytest.mark.parametrize("method", list(KERNEL_METHODS))
def test_interpreted_triton_path_equals_plain_path(method):
    options, expected = KERNEL_METHODS[method]
    x, y = images(2, seed=4), torch.tensor([1, 3])
    torch.manual_seed(0)
    fast = perturb(fp.create(method, shapes_clip(), CLASSNAMES, **options)).train()
    torch.manual_seed(0)
    plain = perturb(fp.create(method, shapes_clip(), CLASSNAMES, **options)).train().set_fast(False)
    kernels.reset_launch_counts()
    with kernels.use("triton"):
        lf, gf = loss_and_grads(fast, x, y)
        launched = dict(kernels.launch_counts)
        fast.eval()
        with torch.no_grad():
            logits_fast = fast(x)
    assert expected <= set(launched), f"kernels that ran: {launched}"
    kernels.reset_launch_counts()
    lp, gp = loss_and_grads(plain, x, y)
    assert not kernels.launch_counts, "the plain path must not launch kernels"
    torch.testing.assert_close(lf, lp, rtol=1e-5, atol=1e-5)
    assert gf.keys() == gp.keys() and gf
    for k in gf:
        rel = float((gf[k] - gp[k]).abs().max() / gp[k].abs().max().clamp_min(1e-20))
        assert rel < 1e-4, f"{k}: max|Δgrad| / max|grad| = {rel:.3g}"
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits_fast, plain(x), rtol=1e-5, atol=1e-4)
