"""Pure-torch references of the fused kernels (autograd through plain torch ops).

Same signatures as the Triton versions; the dispatcher uses them off CUDA, export traces them and
the benchmarks use them as the eager baseline. The argument checks live here and are shared by the
Triton wrappers, so both paths raise the same ``ValueError``s.

Dtype rule (both paths): the *activation dtype* is ``h.dtype`` (adapter) / ``x.dtype`` (insertion).
Parameters (weights, biases, prompts) of any float dtype are rounded to the activation dtype — what
``torch.autocast`` does to an ``nn.Linear`` — and every sum (matmul accumulation, LayerNorm
statistics) is taken in fp32. Outputs are in the activation dtype; each gradient comes back in its
own input's dtype. The Triton kernels additionally keep all intermediates in fp32 and round once at
the output, so on bf16/fp16 they agree with this reference to within the activation dtype's
rounding, and to fp32 tolerance on fp32.
"""
from __future__ import annotations

import operator
import numbers

import torch
import torch.nn.functional as F

__all__ = ["adapter_residual", "insert_prompts_layernorm"]


# ----------------------------------------------------------------------------------------- checks
def _shape(t) -> str:
    return "None" if t is None else f"[{', '.join(str(s) for s in t.shape)}]"


def _expect(name: str, t, shape: tuple, what: str, fn: str, float_only: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a tensor of shape {what}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {what} = {list(shape)}, got {_shape(t)}")
    if float_only and not t.is_floating_point():
        raise ValueError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")


def _same_device(fn: str, **tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"{fn}: all tensors must be on one device, got {listing}")


def as_scale(scale) -> float:
    """``scale`` as a Python float (a number or a 1-element tensor that does not require grad)."""
    if type(scale) is float:
        return scale
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"adapter_residual: scale must be a number, got a tensor of shape "
                             f"{_shape(scale)}")
        if scale.requires_grad:
            raise ValueError("adapter_residual: scale must be a constant (a tensor that requires "
                             "grad is not supported)")
        return float(scale.item())
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(f"adapter_residual: scale must be a real number, got {scale!r}")
    return float(scale)


def _fast_ok(h, tensors, shapes) -> bool:
    """The common valid call, checked in ~2 us: float tensors of these shapes on h's device."""
    try:
        dev = h.device
        for t, shape in zip(tensors, shapes):
            if t.shape != shape or not t.is_floating_point() or t.device != dev:
                return False
        return True
    except (AttributeError, TypeError):
        return False


def check_adapter_args(h, y, w_down, b_down, w_shared, b_shared, w_up, b_up) -> tuple[int, int]:
    """Validate :func:`adapter_residual` arguments; return ``(D, R)``."""
    try:  # fast path: everything valid (the slow path below names the first problem)
        D, R = h.shape[-1], w_down.shape[0]
        if y.dtype == h.dtype and _fast_ok(h, (h, y, w_down, b_down, w_shared, b_shared, w_up, b_up),
                                           (h.shape, h.shape, (R, D), (R,), (R, R), (R,), (D, R), (D,))):
            return D, R
    except (AttributeError, IndexError, TypeError):
        pass
    fn = "adapter_residual"
    if not isinstance(h, torch.Tensor) or h.dim() < 1:
        got = _shape(h) if isinstance(h, torch.Tensor) else type(h).__name__
        raise ValueError(f"{fn}: h must be a tensor of shape [..., D], got {got}")
    if not h.is_floating_point():
        raise ValueError(f"{fn}: h must be a floating-point tensor, got {h.dtype}")
    D = h.shape[-1]
    _expect("y", y, h.shape, "[..., D] (the shape of h)", fn)
    if y.dtype != h.dtype:
        raise ValueError(f"{fn}: y must have h's dtype {h.dtype}, got {y.dtype}")
    if not isinstance(w_down, torch.Tensor) or w_down.dim() != 2:
        got = _shape(w_down) if isinstance(w_down, torch.Tensor) else type(w_down).__name__
        raise ValueError(f"{fn}: w_down must be a 2-D tensor of shape [R, D] = [R, {D}], got {got}")
    R = w_down.shape[0]
    _expect("w_down", w_down, (R, D), "[R, D]", fn)
    _expect("b_down", b_down, (R,), "[R]", fn)
    _expect("w_shared", w_shared, (R, R), "[R, R]", fn)
    _expect("b_shared", b_shared, (R,), "[R]", fn)
    _expect("w_up", w_up, (D, R), "[D, R]", fn)
    _expect("b_up", b_up, (D,), "[D]", fn)
    _same_device(fn, h=h, y=y, w_down=w_down, b_down=b_down, w_shared=w_shared, b_shared=b_shared,
                 w_up=w_up, b_up=b_up)
    return D, R


def check_insert_args(x, prompts, start, weight, bias, eps) -> tuple[int, int, int, int, int]:
    """Validate :func:`insert_prompts_layernorm` arguments; return ``(B, L, D, n, start)``."""
    try:  # fast path: everything valid (the slow path below names the first problem)
        B, L, D = x.shape
        n = prompts.shape[-2]
        if (type(start) is int and 0 <= start <= L - n and type(eps) is float and eps > 0
                and _fast_ok(x, [t for t in (x, prompts, weight, bias) if t is not None],
                             [x.shape, (n, D) if prompts.dim() == 2 else (B, n, D)]
                             + [(D,)] * ((weight is not None) + (bias is not None)))):
            return B, L, D, n, start
    except (AttributeError, IndexError, TypeError, ValueError):
        pass
    fn = "insert_prompts_layernorm"
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        got = _shape(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{fn}: x must be a tensor of shape [B, L, D], got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{fn}: x must be a floating-point tensor, got {x.dtype}")
    B, L, D = x.shape
    if not isinstance(prompts, torch.Tensor) or prompts.dim() not in (2, 3):
        got = _shape(prompts) if isinstance(prompts, torch.Tensor) else type(prompts).__name__
        raise ValueError(f"{fn}: prompts must have shape [n, D] or [B, n, D] = [{B}, n, {D}], got {got}")
    n = prompts.shape[-2]
    if prompts.dim() == 2:
        _expect("prompts", prompts, (n, D), "[n, D] (or [B, n, D])", fn)
    else:
        _expect("prompts", prompts, (B, n, D), "[B, n, D] (or [n, D])", fn)
    try:
        if isinstance(start, bool):
            raise TypeError
        start = operator.index(start)
    except TypeError:
        raise ValueError(f"{fn}: start must be an int, got {start!r}") from None
    if start < 0 or start + n > L:
        raise ValueError(f"{fn}: need 0 <= start and start + n <= L; got start={start}, n={n}, L={L}")
    if weight is not None:
        _expect("weight", weight, (D,), "[D]", fn)
    if bias is not None:
        _expect("bias", bias, (D,), "[D]", fn)
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps > 0:  # NaN too
        raise ValueError(f"{fn}: eps must be a positive number, got {eps!r}")
    _same_device(fn, x=x, prompts=prompts, weight=weight, bias=bias)
    return B, L, D, n, start


# -------------------------------------------------------------------------------- grad-scale ops
class _ScaleGradOnly(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class _ScaleForwardOnly(torch.autograd.Function):
    """Forward multiplies by ``scale``; backward passes the gradient through unchanged."""

    @staticmethod
    def forward(ctx, x, scale):
        return x * scale

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# ---------------------------------------------------------------------------------- references
def adapter_residual(h, y, w_down, b_down, w_shared, b_shared, w_up, b_up, scale, grad_scale=True):
    """MMA adapter branch added to a block output.

    ``out = y + scale * f(h)`` with ``f(h) = relu(relu(h W_d^T + b_d) W_s^T + b_s) W_u^T + b_u``
    (nn.Linear layout: ``W_d`` [R, D], ``W_s`` [R, R], ``W_u`` [D, R]; h, y: [..., D]).

    Gradients, with ``g = dL/dout``: ``dy = g``; ``dh = scale * (df/dh)^T g`` always. With
    ``grad_scale=True`` the parameters get the gradient of the *unscaled* branch
    (``dW = (df/dW)^T g``, no factor ``scale``); with ``grad_scale=False`` they get the ordinary
    gradient ``scale * (df/dW)^T g``. Implemented with two tiny autograd Functions: one applied to
    ``h`` (identity forward, gradient times ``scale``) and one to ``f`` (times ``scale`` forward,
    identity backward).
    """
    check_adapter_args(h, y, w_down, b_down, w_shared, b_shared, w_up, b_up)
    scale = as_scale(scale)
    dt = h.dtype
    # the two Functions only matter for gradients; without autograd (inference, export) the
    # branch is plain torch ops
    grad_scale = grad_scale and torch.is_grad_enabled()
    if grad_scale:
        h = _ScaleGradOnly.apply(h, scale)
    a = F.relu(F.linear(h, w_down.to(dt), b_down.to(dt)))
    a = F.relu(F.linear(a, w_shared.to(dt), b_shared.to(dt)))
    f = F.linear(a, w_up.to(dt), b_up.to(dt))
    f = _ScaleForwardOnly.apply(f, scale) if grad_scale else f * scale
    return (y + f).to(dt)


def insert_prompts_layernorm(x, prompts, start, weight, bias, eps=1e-5):
    """Overwrite rows ``start:start+n`` of ``x`` with ``prompts`` and LayerNorm the result.

    ``x_new = x`` with ``x_new[:, start:start+n] = prompts`` (``prompts`` [n, D] is shared by the
    batch, [B, n, D] is per sample); ``h = (x_new - mu) / sqrt(var + eps) * weight + bias`` with
    ``mu``, ``var`` the (biased) mean / variance over the last dimension, in fp32. Returns
    ``(x_new, h)``, both in ``x.dtype``. The gradient of ``x`` is zero on the replaced rows; the
    gradient of shared prompts is summed over the batch.
    """
    if torch.jit.is_tracing():
        # a trace (ONNX export): the sizes and `start` are traced values, and checking them would
        # write their arithmetic into the graph; the eager call of the same module checks them
        B, n, D = x.shape[0], prompts.shape[-2], x.shape[-1]
    else:
        B, L, D, n, start = check_insert_args(x, prompts, start, weight, bias, eps)
    dt = x.dtype
    p = prompts.to(dt)
    if p.dim() == 2:
        p = p.unsqueeze(0).expand(B, n, D)
    x_new = torch.cat([x[:, :start], p, x[:, start + n:]], dim=1)
    w = None if weight is None else weight.to(dt)
    b = None if bias is None else bias.to(dt)
    # int(D): a constant under torch.jit.trace, so the ONNX export keeps a static normalized_shape
    h = F.layer_norm(x_new, (int(D),), w, b, float(eps)).to(dt)
    return x_new, h
