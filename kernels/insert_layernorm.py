"""Triton kernels for prompt insertion fused with the following LayerNorm.

Forward, per row (b, l) of x [B, L, D], with P the prompt rows ``start <= l < start + n``::

    x_new[b, l] = prompts[(b,) l - start]  if l in P  else x[b, l]
    mu = mean_d x_new[b, l],  var = mean_d (x_new[b, l] - mu)^2,  rstd = 1 / sqrt(var + eps)
    (mu corrected once by the mean of the first residuals, see ``_centre``)
    xhat = (x_new[b, l] - mu) * rstd,  h[b, l] = xhat * weight + bias

Backward with gx = dL/dx_new and gh = dL/dh (either may be absent), gw = gh * weight::

    total = gx + rstd * (gw - mean_d(gw) - xhat * mean_d(gw * xhat))      (LayerNorm backward)
    dx[b, l]       = 0 if l in P else total[b, l]
    dprompts[(b,) j] = total[b, start + j]       (summed over b for shared [n, D] prompts)
    dweight = sum_rows gh * xhat,   dbias = sum_rows gh

Kernels (e = element size; D is a compile-time constant, BLOCK_D = next_pow2(D)):

* ``_fwd``, grid cdiv(B L, BLOCK_M): a program owns BLOCK_M whole rows; each row is read once
  (from x or from prompts) and both outputs are written from registers (no ``torch.cat`` copy).
  HBM: read B L D e, write 2 B L D e. Nothing else is saved: the backward recomputes mu and rstd
  from x_new, which it reads anyway.
* ``_bwd``, grid n_progs: program p handles row blocks p, p + n_progs, ... (n_progs = number of
  blocks, or ~2 per SM when dweight / dbias are needed: then each program keeps [BLOCK_M, D] fp32
  sums in registers and writes one partial row, summed once on the host, no atomics). Programs
  p < n also produce dprompts[:, p] (prompt j of every sample, summed over b in registers for
  shared prompts), written directly in the prompts' dtype. HBM: read x_new, gx, gh, write dx =
  4 B L D e (+ n B D e re-read for the prompt rows).

Dtype rule (see ``reference``): prompts, weight and bias are rounded to x's dtype; statistics and
arithmetic in fp32; x_new and h in x's dtype; gradients in each input's own dtype.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from . import dispatch
from .common import _cvt, make_configure
from .reference import check_insert_args


@triton.jit
def _centre(v, keep, eps, D: tl.constexpr):
    """(v - mu, rstd) of fp32 rows v [M, BLOCK_D] over the ``keep`` columns (0 elsewhere). mu is
    the row sum / D corrected once by the mean of the first residuals, so a constant row is
    centred to exactly 0 whatever its magnitude (one-pass fp32 sums are off by ~|v| 2^-24 log D,
    which 1/sqrt(eps) would amplify)."""
    mean = tl.sum(v, axis=1) / D
    xc = tl.where(keep, v - mean[:, None], 0.0)
    mean += tl.sum(xc, axis=1) / D
    xc = tl.where(keep, v - mean[:, None], 0.0)
    return xc, 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)


@triton.jit
def _fwd(x_ptr, p_ptr, w_ptr, b_ptr, xn_ptr, h_ptr, n_rows, L, n, start, sx_b, sx_l, sp_b, sp_n, eps,
         D: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, EMU: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid cdiv(B L, BLOCK_M). HBM: each row read once (x or prompts), x_new and h written (3 B L D e)."""
    act = x_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)
    bi = rows // L
    li = rows % L
    j = li - start
    is_p = row_ok & (j >= 0) & (j < n)
    is_x = row_ok & ((j < 0) | (j >= n))
    cols = tl.arange(0, BLOCK_D)
    c_ok = cols < D
    xv = tl.load(x_ptr + bi[:, None] * sx_b + li[:, None] * sx_l + cols[None, :],
                 mask=is_x[:, None] & c_ok[None, :], other=0.0)
    pv = tl.load(p_ptr + bi[:, None] * sp_b + tl.where(is_p, j, 0)[:, None] * sp_n + cols[None, :],
                 mask=is_p[:, None] & c_ok[None, :], other=0.0)
    v = tl.where(is_p[:, None], _cvt(pv, act, EMU), xv)
    out = rows[:, None] * D + cols[None, :]
    mask = row_ok[:, None] & c_ok[None, :]
    tl.store(xn_ptr + out, v, mask=mask)
    xc, rstd = _centre(v.to(tl.float32), c_ok[None, :], eps, D)
    hv = xc * rstd[:, None]
    if HAS_W:
        hv = hv * _cvt(tl.load(w_ptr + cols, mask=c_ok, other=0.0), act, EMU).to(tl.float32)[None, :]
    if HAS_B:
        hv = hv + _cvt(tl.load(b_ptr + cols, mask=c_ok, other=0.0), act, EMU).to(tl.float32)[None, :]
    tl.store(h_ptr + out, _cvt(hv, act, EMU), mask=mask)


@triton.jit
def _row_grads(xn_ptr, gx_ptr, gh_ptr, w, rows, row_ok, cols, c_ok, eps, D: tl.constexpr,
               HAS_GX: tl.constexpr, HAS_GH: tl.constexpr, HAS_W: tl.constexpr):
    """(total, gh, xhat) of a [rows, BLOCK_D] tile; mu / rstd recomputed from x_new."""
    mask = row_ok[:, None] & c_ok[None, :]
    wide = rows[:, None] * D + cols[None, :]
    total = tl.zeros(mask.shape, dtype=tl.float32)
    gh = tl.zeros(mask.shape, dtype=tl.float32)
    xhat = tl.zeros(mask.shape, dtype=tl.float32)
    if HAS_GH:
        xc, rstd = _centre(tl.load(xn_ptr + wide, mask=mask, other=0.0).to(tl.float32), mask, eps, D)
        xhat = xc * rstd[:, None]
        gh = tl.load(gh_ptr + wide, mask=mask, other=0.0).to(tl.float32)
        gw = gh
        if HAS_W:
            gw = gh * w[None, :]
        c1 = tl.sum(gw * xhat, axis=1) / D
        c2 = tl.sum(gw, axis=1) / D
        total = tl.where(mask, rstd[:, None] * (gw - xhat * c1[:, None] - c2[:, None]), 0.0)
    if HAS_GX:
        total += tl.load(gx_ptr + wide, mask=mask, other=0.0).to(tl.float32)
    return total, gh, xhat


@triton.jit
def _bwd(xn_ptr, gx_ptr, gh_ptr, w_ptr, dx_ptr, dp_ptr, dwb_ptr, n_rows, L, n, start, B, eps, n_progs,
         D: tl.constexpr, HAS_GX: tl.constexpr, HAS_GH: tl.constexpr, HAS_W: tl.constexpr,
         NEED_DX: tl.constexpr, NEED_DP: tl.constexpr, SHARED: tl.constexpr, NEED_DW: tl.constexpr,
         NEED_DB: tl.constexpr, EMU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid n_progs (see the module doc). HBM: x_new, gx, gh read, dx written (4 B L D e), the
    B n prompt rows re-read for dprompts, one [2, D] fp32 partial per program for dweight / dbias."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    c_ok = cols < D
    w = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_W:
        w = _cvt(tl.load(w_ptr + cols, mask=c_ok, other=0.0), xn_ptr.dtype.element_ty, EMU).to(tl.float32)
    acc_w = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if NEED_DX or NEED_DW or NEED_DB:
        for blk in range(pid, tl.cdiv(n_rows, BLOCK_M), n_progs):
            rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < n_rows
            rows = rows.to(tl.int64)
            total, gh, xhat = _row_grads(xn_ptr, gx_ptr, gh_ptr, w, rows, row_ok, cols, c_ok, eps, D,
                                         HAS_GX, HAS_GH, HAS_W)
            if NEED_DW:
                acc_w += gh * xhat
            if NEED_DB:
                acc_b += gh
            if NEED_DX:
                j = rows % L - start
                is_p = (j >= 0) & (j < n)
                tl.store(dx_ptr + rows[:, None] * D + cols[None, :],
                         _cvt(tl.where(is_p[:, None], 0.0, total), dx_ptr.dtype.element_ty, EMU),
                         mask=row_ok[:, None] & c_ok[None, :])
    if NEED_DW:  # partials [n_progs, 2, D]
        tl.store(dwb_ptr + pid * 2 * D + cols, tl.sum(acc_w, axis=0), mask=c_ok)
    if NEED_DB:
        tl.store(dwb_ptr + pid * 2 * D + D + cols, tl.sum(acc_b, axis=0), mask=c_ok)
    if NEED_DP:  # prompt j = pid, pid + n_progs, ...: rows (b, start + j) for every b
        for jp in range(pid, n, n_progs):
            acc_p = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for b0 in range(0, B, BLOCK_M):
                bb = b0 + tl.arange(0, BLOCK_M)
                b_ok = bb < B
                bb = bb.to(tl.int64)
                total, gh, xhat = _row_grads(xn_ptr, gx_ptr, gh_ptr, w, bb * L + start + jp, b_ok, cols,
                                             c_ok, eps, D, HAS_GX, HAS_GH, HAS_W)
                if SHARED:
                    acc_p += tl.sum(total, axis=0)
                else:
                    tl.store(dp_ptr + (bb * n + jp)[:, None] * D + cols[None, :],
                             _cvt(total, dp_ptr.dtype.element_ty, EMU), mask=b_ok[:, None] & c_ok[None, :])
            if SHARED:
                tl.store(dp_ptr + jp * D + cols, _cvt(acc_p, dp_ptr.dtype.element_ty, EMU), mask=c_ok)


# ------------------------------------------------------------------------------------ host side
#: Overrides of the heuristics (BLOCK_M, num_warps, bwd_warps, reduce_per_sm); use ``configure``.
_OVERRIDES: dict = {}


@functools.lru_cache(maxsize=1024)
def _plan(n_rows: int, D: int, dev: int) -> tuple[dict, dict, int]:
    """(forward meta, backward meta, programs when dweight / dbias are reduced) for one shape."""
    o = _OVERRIDES
    block_d = max(16, triton.next_power_of_2(D))
    if dev >= 0:  # ~4K elements per program: a few ViT rows, 32 fp32 values per thread (ptxas: ~64 regs)
        block_m = o.get("BLOCK_M", max(1, min(64, 4096 // block_d)))
        warps = o.get("num_warps", min(8, max(1, block_d * block_m // 1024)))
        fwd = dict(BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
        bwd = dict(BLOCK_M=block_m, BLOCK_D=block_d, num_warps=o.get("bwd_warps", min(8, 2 * warps)))
        reduce_progs = min(triton.cdiv(n_rows, block_m), o.get("reduce_per_sm", 2) * dispatch.sm_count(dev))
    else:  # interpreter: few, larger programs; still several blocks per program in the tests
        block_m = o.get("BLOCK_M", 4)
        fwd = bwd = dict(BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)
        reduce_progs = min(triton.cdiv(n_rows, block_m), 3)
    return fwd, bwd, reduce_progs


configure = make_configure(_OVERRIDES, _plan)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(x, prompts, weight, bias, start, eps):
    B, L, D = x.shape
    x, prompts = _unit_last(x), _unit_last(prompts)
    n_rows = B * L
    x_new = torch.empty((B, L, D), device=x.device, dtype=x.dtype)
    h = torch.empty((B, L, D), device=x.device, dtype=x.dtype)
    if prompts.dim() == 3:
        sp_b, sp_n = prompts.stride(0), prompts.stride(1)
    else:
        sp_b, sp_n = 0, prompts.stride(0)
    fwd, _, _ = _plan(n_rows, D, x.get_device())
    dispatch.record_launch("insert_layernorm_fwd")
    _fwd[(triton.cdiv(n_rows, fwd["BLOCK_M"]),)](
        x, prompts, weight if weight is not None else x, bias if bias is not None else x, x_new, h,
        n_rows, L, prompts.shape[-2], start, x.stride(0), x.stride(1), sp_b, sp_n, eps,
        D=D, HAS_W=weight is not None, HAS_B=bias is not None, EMU=not x.is_cuda, **fwd)
    return x_new, h


class _InsertLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, prompts, weight, bias, start, eps):
        x_new, h = _forward(x, prompts, weight, bias, start, eps)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x_new, weight)
        ctx.meta = (prompts.shape, prompts.dtype, start, eps,
                    None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return x_new, h

    @staticmethod
    @once_differentiable  # a double backward raises instead of silently dropping 2nd-order terms
    def backward(ctx, g_xnew, g_h):
        need_x, need_p, need_w, need_b = ctx.needs_input_grad[:4]
        need_w = need_w and g_h is not None
        need_b = need_b and g_h is not None
        if (g_xnew is None and g_h is None) or not (need_x or need_p or need_w or need_b):
            return None, None, None, None, None, None
        x_new, weight = ctx.saved_tensors
        p_shape, p_dtype, start, eps, w_dtype, b_dtype = ctx.meta
        B, L, D = x_new.shape
        n = p_shape[-2]
        n_rows = B * L
        _, meta, reduce_progs = _plan(n_rows, D, x_new.get_device())
        n_blocks = triton.cdiv(n_rows, meta["BLOCK_M"])
        n_progs = reduce_progs if (need_w or need_b) else (n_blocks if need_x else n)
        dev = x_new.device
        dx = torch.empty_like(x_new) if need_x else None
        dp = torch.empty(p_shape, device=dev, dtype=p_dtype) if need_p else None
        dwb = torch.empty((n_progs, 2, D), device=dev, dtype=torch.float32) if (need_w or need_b) else None
        gx = None if g_xnew is None else (g_xnew if g_xnew.is_contiguous() else g_xnew.contiguous())
        gh = None if g_h is None else (g_h if g_h.is_contiguous() else g_h.contiguous())
        dummy = x_new
        dispatch.record_launch("insert_layernorm_bwd")
        _bwd[(n_progs,)](
            x_new, *(t if t is not None else dummy for t in (gx, gh, weight, dx, dp, dwb)),
            n_rows, L, n, start, B, eps, n_progs,
            D=D, HAS_GX=gx is not None, HAS_GH=gh is not None, HAS_W=weight is not None, NEED_DX=need_x,
            NEED_DP=need_p, SHARED=len(p_shape) == 2, NEED_DW=need_w, NEED_DB=need_b, EMU=not dev.type == "cuda",
            **meta)
        dweight = dbias = None
        if need_w or need_b:
            sums = dwb.sum(0)
            if need_w:
                dweight = sums[0] if w_dtype == torch.float32 else sums[0].to(w_dtype)
            if need_b:
                dbias = sums[1] if b_dtype == torch.float32 else sums[1].to(b_dtype)
        return dx, dp, dweight, dbias, None, None


def insert_prompts_layernorm(x, prompts, start, weight, bias, eps=1e-5):
    """Triton version of :func:`fastprompt.kernels.reference.insert_prompts_layernorm`."""
    B, L, D, n, start = check_insert_args(x, prompts, start, weight, bias, eps)
    if x.numel() == 0 or n == 0 or x.dtype == torch.float64:  # the kernels cover fp32 / bf16 / fp16
        from .reference import insert_prompts_layernorm as ref
        return ref(x, prompts, start, weight, bias, eps)
    # the kernels read weight / bias with unit stride (a copy only for strided or expanded ones;
    # differentiable, so their gradients still reach the caller's tensors)
    weight = None if weight is None else _unit_last(weight)
    bias = None if bias is None else _unit_last(bias)
    if torch.is_grad_enabled() and (x.requires_grad or prompts.requires_grad
                                    or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad)):
        return _InsertLayerNorm.apply(x, prompts, weight, bias, start, float(eps))
    return _forward(x, prompts, weight, bias, start, float(eps))
