"""Triton kernels for the MMA adapter residual ``out = y + s * f(h)``.

Math (T tokens = all leading dims of h flattened, R = adapter width, s = scale)::

    z1 = h W_d^T + b_d      a1 = relu(z1)          [T, R]
    z2 = a1 W_s^T + b_s     a2 = relu(z2)          [T, R]
    f  = a2 W_u^T + b_u                            [T, D]
    out = y + s * f

Backward with g = dL/dout and c = 1 if grad_scale else s (the parameters' factor)::

    dy  = g
    da2 = g W_u             dz2 = da2 * [a2 > 0]   dz1 = (dz2 W_s) * [a1 > 0]
    dh  = s * dz1 W_d
    dW_u = c g^T a2    db_u = c sum_t g
    dW_s = c dz2^T a1  db_s = c sum_t dz2
    dW_d = c dz1^T h   db_d = c sum_t dz1

Kernels (e = element size of the activations; D and R are compile-time constants):

* ``_fwd``, grid cdiv(T, BLOCK_T): a program owns BLOCK_T tokens. Loop 1 streams h in BLOCK_D
  chunks into z1 [BLOCK_T, R] (fp32, registers); the narrow layers run in registers; loop 2 streams
  y / out in BLOCK_DO chunks (the next y chunk is loaded before the current one is stored).
  HBM: read h, y, write out = 3 T D e (+ 8 T R for a1, a2 when a backward will follow). The
  weights (3 R D + R^2 values) are re-read by every program from L2.
* ``_bwd_rows``, grid cdiv(T, BLOCK_T_BWD) (= BLOCK_T unless tuned): streams g -> da2, then dz2, dz1 in registers, then
  writes dh = s dz1 W_d; writes dz1 (fp32) when dW_d is needed and one partial row
  [dW_s | db_s | db_d] per program. HBM: read g, write dh = 2 T D e (+ narrow [T, R] terms).
* ``_bwd_weights``, grid (cdiv(D, BLOCK_DB), S): program (j, s) accumulates columns j of dW_u,
  db_u, dW_d over token split s in registers and writes them to row s of a [S, P] fp32
  workspace; programs (0, s) also fold the rows kernel's narrow partials of split s into that row.
  HBM: read g, h = 2 T D e; workspace S P 4 bytes (S ~ 2 * SMs / cdiv(D, BLOCK_DB)).
  The host sums the workspace once (``.sum(0)``: deterministic, no atomics).

Dtype rule (see ``reference``): parameters are rounded to the activation dtype, every sum is fp32
and the outputs are rounded once. Wide products of two activation-dtype operands (h W_d^T, g W_u)
are exact tensor-core products. An fp32 intermediate (a1, a2, dz1, dz2) times a wide operand is
split hi + lo into two activation-dtype operands (two tensor-core dots, ~16 significant bits; eager
bf16 keeps 8). The [.., R] x [R, R] products are plain fp32 (``ieee``). With fp32 activations every
dot is IEEE fp32 (TF32 only if ``torch.backends.cuda.matmul.allow_tf32`` is set).
The interpreter cannot multiply bf16 in ``tl.dot``; there (EMU) the exact fp32 values are used.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from . import dispatch
from .common import _cvt, make_configure
from .reference import as_scale, check_adapter_args


# ------------------------------------------------------------------------------------ helpers
@triton.jit
def _dot(a, b, acc, EMU: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b for a, b of one dtype (exact products, fp32 sums). EMU: the interpreter's
    tl.dot cannot multiply bf16, so the (exact) fp32 values are used."""
    if EMU and a.dtype == tl.bfloat16:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _dot_fa(x, w, acc, SPLIT: tl.constexpr, EMU: tl.constexpr, PREC: tl.constexpr):
    """acc + x @ w, x fp32 (an intermediate), w in the activation dtype."""
    if SPLIT:
        hi = x.to(w.dtype)
        acc = _dot(hi, w, acc, EMU, PREC)
        acc = _dot((x - hi.to(tl.float32)).to(w.dtype), w, acc, EMU, PREC)
    else:
        acc = tl.dot(x, w, acc, input_precision=PREC)
    return acc


@triton.jit
def _dot_fb(w, x, acc, SPLIT: tl.constexpr, EMU: tl.constexpr, PREC: tl.constexpr):
    """acc + w @ x, w in the activation dtype, x fp32 (an intermediate)."""
    if SPLIT:
        hi = x.to(w.dtype)
        acc = _dot(w, hi, acc, EMU, PREC)
        acc = _dot(w, (x - hi.to(tl.float32)).to(w.dtype), acc, EMU, PREC)
    else:
        acc = tl.dot(w, x, acc, input_precision=PREC)
    return acc


# ------------------------------------------------------------------------------------ kernels
@triton.jit
def _fwd(h_ptr, y_ptr, out_ptr, act_ptr, wd_ptr, bd_ptr, ws_ptr, bs_ptr, wu_ptr, bu_ptr,
         T, stride_h, stride_y, scale,
         D: tl.constexpr, R: tl.constexpr, SAVE: tl.constexpr, SPLIT: tl.constexpr,
         EMU: tl.constexpr, PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
         BLOCK_DO: tl.constexpr, BLOCK_R: tl.constexpr):
    """Grid cdiv(T, BLOCK_T). HBM: h, y read once, out written once (3 T D e); a1, a2 (8 T R) only
    if SAVE. Loop 1 (h, W_d chunks) is software-pipelined by Triton (cp.async, num_stages)."""
    act = h_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows = rows.to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    # z1 = h W_d^T: stream h over D
    z1 = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        hv = tl.load(h_ptr + rows[:, None] * stride_h + dd[None, :], mask=row_ok[:, None] & d_ok[None, :],
                     other=0.0)
        wdt = tl.load(wd_ptr + rr[None, :] * D + dd[:, None], mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        z1 = _dot(hv, _cvt(wdt, act, EMU), z1, EMU, PREC)
    a1 = tl.maximum(z1 + _cvt(tl.load(bd_ptr + rr, mask=r_ok, other=0.0), act, EMU).to(tl.float32)[None, :], 0.0)
    wst = tl.load(ws_ptr + rr[None, :] * R + rr[:, None], mask=r_ok[:, None] & r_ok[None, :], other=0.0)
    z2 = tl.dot(a1, _cvt(wst, act, EMU).to(tl.float32), input_precision="ieee")
    a2 = tl.maximum(z2 + _cvt(tl.load(bs_ptr + rr, mask=r_ok, other=0.0), act, EMU).to(tl.float32)[None, :], 0.0)
    if SAVE:  # a1, a2 [2, T, R] fp32 for the backward
        narrow = act_ptr + rows[:, None] * R + rr[None, :]
        narrow_ok = row_ok[:, None] & r_ok[None, :]
        tl.store(narrow, a1, mask=narrow_ok)
        tl.store(narrow + T * R, a2, mask=narrow_ok)
    # out = y + s (a2 W_u^T + b_u): stream y / out over D, one y chunk ahead
    y_row = y_ptr + rows[:, None] * stride_y
    o_row = out_ptr + rows[:, None] * D
    dd = tl.arange(0, BLOCK_DO)
    yv = tl.load(y_row + dd[None, :], mask=row_ok[:, None] & (dd < D)[None, :], other=0.0)
    for d0 in range(0, D, BLOCK_DO):
        dd = d0 + tl.arange(0, BLOCK_DO)
        d_ok = dd < D
        dn = dd + BLOCK_DO
        y_next = tl.load(y_row + dn[None, :], mask=row_ok[:, None] & (dn < D)[None, :], other=0.0)
        wut = tl.load(wu_ptr + dd[None, :] * R + rr[:, None], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        f = _dot_fa(a2, _cvt(wut, act, EMU), tl.zeros((BLOCK_T, BLOCK_DO), dtype=tl.float32), SPLIT, EMU, PREC)
        bu = _cvt(tl.load(bu_ptr + dd, mask=d_ok, other=0.0), act, EMU).to(tl.float32)
        o = yv.to(tl.float32) + scale * (f + bu[None, :])
        tl.store(o_row + dd[None, :], _cvt(o, act, EMU), mask=row_ok[:, None] & d_ok[None, :])
        yv = y_next


@triton.jit
def _bwd_rows(g_ptr, act_ptr, dh_ptr, scr_ptr, wd_ptr, ws_ptr, wu_ptr, T, stride_g, scale, narrow_off,
              D: tl.constexpr, R: tl.constexpr, NEED_DH: tl.constexpr, NEED_DZ1: tl.constexpr,
              NEED_NARROW: tl.constexpr, SPLIT: tl.constexpr, EMU: tl.constexpr, PREC: tl.constexpr,
              BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, BLOCK_R: tl.constexpr):
    """Grid cdiv(T, BLOCK_T). HBM: g read once, dh written once (2 T D e), a1, a2 read (8 T R),
    dz1 written (4 T R, if dW_d is needed), one [R^2 + 2R] fp32 partial per program."""
    act = g_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows = rows.to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    narrow = rows[:, None] * R + rr[None, :]
    narrow_ok = row_ok[:, None] & r_ok[None, :]
    # da2 = g W_u: stream g over D (padded rows load 0 and add nothing anywhere below)
    da2 = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        gv = tl.load(g_ptr + rows[:, None] * stride_g + dd[None, :], mask=row_ok[:, None] & d_ok[None, :],
                     other=0.0)
        wu = tl.load(wu_ptr + dd[:, None] * R + rr[None, :], mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        da2 = _dot(gv, _cvt(wu, act, EMU), da2, EMU, PREC)
    # the full reduction over D is complete here: the ReLU masks act on whole rows
    a1 = tl.load(act_ptr + narrow, mask=narrow_ok, other=0.0)
    a2 = tl.load(act_ptr + T * R + narrow, mask=narrow_ok, other=0.0)
    dz2 = tl.where(a2 > 0.0, da2, 0.0)
    ws = tl.load(ws_ptr + rr[:, None] * R + rr[None, :], mask=r_ok[:, None] & r_ok[None, :], other=0.0)
    dz1 = tl.where(a1 > 0.0, tl.dot(dz2, _cvt(ws, act, EMU).to(tl.float32), input_precision="ieee"), 0.0)
    if NEED_NARROW:  # this block's partial [dW_s | db_s | db_d]
        part = scr_ptr + narrow_off + pid * (R * R + 2 * R)
        dws = tl.dot(tl.trans(dz2), a1, input_precision="ieee")
        tl.store(part + rr[:, None] * R + rr[None, :], dws, mask=r_ok[:, None] & r_ok[None, :])
        tl.store(part + R * R + rr, tl.sum(dz2, axis=0), mask=r_ok)
        tl.store(part + R * R + R + rr, tl.sum(dz1, axis=0), mask=r_ok)
    if NEED_DZ1:
        tl.store(scr_ptr + narrow, dz1, mask=narrow_ok)
    if NEED_DH:  # dh = s dz1 W_d
        for d0 in range(0, D, BLOCK_DO):
            dd = d0 + tl.arange(0, BLOCK_DO)
            d_ok = dd < D
            wd = tl.load(wd_ptr + rr[:, None] * D + dd[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
            dh = _dot_fa(dz1, _cvt(wd, act, EMU), tl.zeros((BLOCK_T, BLOCK_DO), dtype=tl.float32), SPLIT, EMU, PREC)
            tl.store(dh_ptr + rows[:, None] * D + dd[None, :], _cvt(scale * dh, act, EMU),
                     mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_weights(g_ptr, h_ptr, act_ptr, scr_ptr, T, stride_g, stride_h, per_split, n_blocks_rows,
                 narrow_off, ws_off, P, off_wu, off_bu, off_wd, off_narrow,
                 D: tl.constexpr, R: tl.constexpr, NEED_WU: tl.constexpr, NEED_BU: tl.constexpr,
                 NEED_WD: tl.constexpr, NEED_NARROW: tl.constexpr, SPLIT: tl.constexpr,
                 EMU: tl.constexpr, PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_R: tl.constexpr, ROWS_BLOCK_T: tl.constexpr, BLOCK_NW: tl.constexpr):
    """Grid (cdiv(D, BLOCK_D), splits). HBM: g and h read once (2 T D e); a2, dz1 (8 T R, re-read
    by every column block, L2-resident); writes row `split` of the [splits, P] fp32 workspace."""
    pid_d = tl.program_id(0)
    split = tl.program_id(1)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    acc_u = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)   # sum_t g[t, d] a2[t, r]
    acc_d = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)   # sum_t dz1[t, r] h[t, d]
    acc_b = tl.zeros((BLOCK_D,), dtype=tl.float32)           # sum_t g[t, d]
    t_begin = split * per_split
    t_end = tl.minimum(t_begin + per_split, T)
    if NEED_WU or NEED_BU or NEED_WD:
        for t0 in range(t_begin, t_end, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            row_ok = rows < t_end
            rows = rows.to(tl.int64)
            wide_ok = row_ok[:, None] & d_ok[None, :]
            narrow = rows[:, None] * R + rr[None, :]
            narrow_ok = row_ok[:, None] & r_ok[None, :]
            if NEED_WU or NEED_BU:
                gv = tl.load(g_ptr + rows[:, None] * stride_g + dd[None, :], mask=wide_ok, other=0.0)
                if NEED_BU:
                    acc_b += tl.sum(gv.to(tl.float32), axis=0)
                if NEED_WU:
                    a2 = tl.load(act_ptr + T * R + narrow, mask=narrow_ok, other=0.0)
                    acc_u = _dot_fb(tl.trans(gv), a2, acc_u, SPLIT, EMU, PREC)
            if NEED_WD:
                hv = tl.load(h_ptr + rows[:, None] * stride_h + dd[None, :], mask=wide_ok, other=0.0)
                dz1 = tl.load(scr_ptr + narrow, mask=narrow_ok, other=0.0)
                acc_d = _dot_fa(tl.trans(dz1), hv, acc_d, SPLIT, EMU, PREC)
    row = scr_ptr + ws_off + split * P
    if NEED_WU:
        tl.store(row + off_wu + dd[:, None] * R + rr[None, :], acc_u, mask=d_ok[:, None] & r_ok[None, :])
    if NEED_BU:
        tl.store(row + off_bu + dd, acc_b, mask=d_ok)
    if NEED_WD:
        tl.store(row + off_wd + rr[:, None] * D + dd[None, :], acc_d, mask=r_ok[:, None] & d_ok[None, :])
    if NEED_NARROW:
        if pid_d == 0:  # fold the rows kernel's partials of this split's token blocks
            nw = R * R + 2 * R
            k = tl.arange(0, BLOCK_NW)
            acc_n = tl.zeros((BLOCK_NW,), dtype=tl.float32)
            b_end = tl.minimum(tl.cdiv(t_end, ROWS_BLOCK_T), n_blocks_rows)
            for blk in range(t_begin // ROWS_BLOCK_T, b_end):
                acc_n += tl.load(scr_ptr + narrow_off + blk * nw + k, mask=k < nw, other=0.0)
            tl.store(row + off_narrow + k, acc_n, mask=k < nw)


# ------------------------------------------------------------------------------------ host side
#: Block-size overrides by name (BLOCK_T, BLOCK_T_BWD, BLOCK_D, BLOCK_DO, num_warps, num_stages,
#: BLOCK_TB, BLOCK_DB, warps_b, splits); for tests and tuning runs: use ``configure(...)``.
_OVERRIDES: dict = {}


@functools.lru_cache(maxsize=1024)
def _plan(T: int, D: int, R: int, dtype: torch.dtype, dev: int, tf32: bool) -> SimpleNamespace:
    """Per-call-shape launch plan (cached): blocks, dtype flags, grids, the backward's token splits."""
    sms = dispatch.sm_count(dev)
    flags = dict(SPLIT=dtype != torch.float32, EMU=dev < 0,
                 PREC="tf32" if tf32 else "ieee")
    o = _OVERRIDES
    block_r = max(16, triton.next_power_of_2(R))
    if dev >= 0:  # ~96-128 registers and ~40 KB shared memory per program (R <= 32, checked with ptxas)
        block_t = 32 if triton.cdiv(T, 32) >= 4 * sms else 16   # 16: ViT batches give ~3 programs/SM
        block_d = block_do = min(128, max(16, triton.next_power_of_2(D)))
        block_tb, block_db, warps, stages = 64, 64, 4 if block_r <= 32 else 8, 3
    else:  # interpreter: small tiles, so the tests cover several D chunks and token blocks
        block_t, block_d, block_do, block_tb, block_db, warps, stages = 16, 32, 64, 32, 32, 4, 1
    block_t, block_d, block_do = o.get("BLOCK_T", block_t), o.get("BLOCK_D", block_d), o.get("BLOCK_DO", block_do)
    block_t_bwd = o.get("BLOCK_T_BWD", block_t)   # the backward's rows kernel (register-heavier)
    block_tb, block_db = max(o.get("BLOCK_TB", block_tb), block_t_bwd), o.get("BLOCK_DB", block_db)
    meta = dict(BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_DO=block_do, BLOCK_R=block_r, D=D, R=R, **flags,
                num_warps=o.get("num_warps", warps), num_stages=o.get("num_stages", stages))
    n_rows, n_rows_bwd = triton.cdiv(T, block_t), triton.cdiv(T, block_t_bwd)
    # token splits of the weight kernel: ~2 programs per SM; a split is whole blocks of both kernels
    n_db = triton.cdiv(D, block_db)
    want = o.get("splits", max(1, triton.cdiv(2 * sms, n_db)))
    per_split = triton.cdiv(triton.cdiv(T, block_tb), min(want, triton.cdiv(T, block_tb))) * block_tb
    splits = triton.cdiv(T, per_split)
    assert per_split % block_t_bwd == 0, "a token split must be whole blocks of the rows kernel"
    meta_b = dict(BLOCK_T=block_tb, BLOCK_D=block_db, BLOCK_R=block_r, ROWS_BLOCK_T=block_t_bwd, D=D, R=R, **flags,
                  BLOCK_NW=triton.next_power_of_2(R * R + 2 * R), num_warps=o.get("warps_b", 8 if dev >= 0 else 4),
                  num_stages=meta["num_stages"])
    return SimpleNamespace(meta=meta, meta_rows={**meta, "BLOCK_T": block_t_bwd}, meta_b=meta_b, n_rows=n_rows,
                           n_rows_bwd=n_rows_bwd, n_db=n_db, splits=splits, per_split=per_split, nw=R * R + 2 * R)


configure = make_configure(_OVERRIDES, _plan)


def _rows(t: torch.Tensor, D: int) -> tuple[torch.Tensor, int]:
    """A [T, D]-addressable tensor with unit column stride and its row stride (no copy if possible)."""
    if t.is_contiguous():
        return t, D
    t2 = t.reshape(-1, D)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2, t2.stride(0)


def _forward(h, y, params, scale, save):
    """Launch ``_fwd``; returns out and what the backward needs."""
    D, R = h.shape[-1], params[0].shape[0]
    h2, stride_h = _rows(h, D)
    y2, stride_y = _rows(y, D)
    T = h.numel() // D
    wd, bd, ws, bs, wu, bu = params if all(p.is_contiguous() for p in params) else (
        p.contiguous() for p in params)
    dtype = h.dtype
    # fp32 activations: IEEE dots unless the user allowed TF32 for fp32 matmuls (read per call)
    plan = _plan(T, D, R, dtype, h.get_device(), dtype is torch.float32 and torch.backends.cuda.matmul.allow_tf32)
    out = torch.empty(h.shape, device=h.device, dtype=dtype)
    acts = torch.empty((2, T, R), device=h.device, dtype=torch.float32) if save else out
    dispatch.record_launch("adapter_residual_fwd")
    _fwd[(plan.n_rows,)](h2, y2, out, acts, wd, bd, ws, bs, wu, bu, T, stride_h, stride_y, scale,
                         SAVE=save, **plan.meta)
    return out, (h2, stride_h, acts, plan, (wd, ws, wu))


class _AdapterResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, y, wd, bd, ws, bs, wu, bu, scale, grad_scale):
        n = ctx.needs_input_grad
        save = n[0] or any(n[2:8])   # a1, a2 only when a backward through the branch can follow
        out, (h2, stride_h, acts, plan, (wd, ws, wu)) = _forward(h, y, (wd, bd, ws, bs, wu, bu), scale, save)
        if save:
            ctx.save_for_backward(h2, acts, wd, ws, wu)
        ctx.meta = (h.shape, stride_h, scale, grad_scale, plan,
                    [p.dtype for p in (wd, bd, ws, bs, wu, bu)])
        return out

    @staticmethod
    @once_differentiable  # a double backward raises instead of silently dropping 2nd-order terms
    def backward(ctx, g):
        need_h, need_y, need_wd, need_bd, need_ws, need_bs, need_wu, need_bu = ctx.needs_input_grad[:8]
        dy = g if need_y else None
        need_narrow = need_ws or need_bs or need_bd
        if not (need_h or need_wd or need_wu or need_bu or need_narrow):
            return None, dy, None, None, None, None, None, None, None, None
        h_shape, stride_h, scale, grad_scale, plan, dtypes = ctx.meta
        h2, acts, wd, ws, wu = ctx.saved_tensors
        D, R, T = wd.shape[1], wd.shape[0], acts.shape[1]
        g2, stride_g = _rows(g, D)
        # one fp32 scratch buffer: [dz1: T R][narrow partials: n_rows nw][workspace: splits P]
        sizes = [("wu", D * R, need_wu), ("bu", D, need_bu), ("wd", R * D, need_wd),
                 ("narrow", plan.nw, need_narrow)]
        offs, P = {}, 0
        for name, size, need in sizes:
            offs[name] = P
            P += size if need else 0
        narrow_off = T * R if need_wd else 0
        ws_off = narrow_off + (plan.n_rows_bwd * plan.nw if need_narrow else 0)
        run_weights = need_wu or need_bu or need_wd or need_narrow
        scratch = torch.empty(max(1, ws_off + (plan.splits * P if run_weights else 0)), device=g.device,
                              dtype=torch.float32)
        dh = torch.empty(h_shape, device=g.device, dtype=h2.dtype) if need_h else scratch
        if need_h or need_wd or need_narrow:
            dispatch.record_launch("adapter_residual_bwd_rows")
            _bwd_rows[(plan.n_rows_bwd,)](
                g2, acts, dh, scratch, wd, ws, wu, T, stride_g, scale, narrow_off,
                NEED_DH=need_h, NEED_DZ1=need_wd, NEED_NARROW=need_narrow, **plan.meta_rows)
        grads = [None] * 6
        if run_weights:
            wide = need_wu or need_bu or need_wd
            dispatch.record_launch("adapter_residual_bwd_weights")
            _bwd_weights[(plan.n_db if wide else 1, plan.splits)](
                g2, h2, acts, scratch, T, stride_g, stride_h, plan.per_split,
                plan.n_rows_bwd, narrow_off, ws_off, P, offs["wu"], offs["bu"], offs["wd"], offs["narrow"],
                NEED_WU=need_wu, NEED_BU=need_bu, NEED_WD=need_wd, NEED_NARROW=need_narrow, **plan.meta_b)
            flat = scratch[ws_off:].view(plan.splits, P)
            flat = flat.sum(0) if plan.splits > 1 else flat[0]
            c = 1.0 if grad_scale else scale
            if c != 1.0:
                flat.mul_(c)
            n, base = offs["narrow"], flat.storage_offset()
            layout = [(need_wd, (R, D), (D, 1), offs["wd"]), (need_bd, (R,), (1,), n + R * R + R),
                      (need_ws, (R, R), (R, 1), n), (need_bs, (R,), (1,), n + R * R),
                      (need_wu, (D, R), (R, 1), offs["wu"]), (need_bu, (D,), (1,), offs["bu"])]
            for i, (need, shape, stride, off) in enumerate(layout):
                if need:
                    t = flat.as_strided(shape, stride, base + off)
                    grads[i] = t if dtypes[i] == torch.float32 else t.to(dtypes[i])
        return (dh if need_h else None), dy, *grads, None, None


def adapter_residual(h, y, w_down, b_down, w_shared, b_shared, w_up, b_up, scale, grad_scale=True):
    """Triton version of :func:`fastprompt.kernels.reference.adapter_residual` (same math, see top)."""
    check_adapter_args(h, y, w_down, b_down, w_shared, b_shared, w_up, b_up)
    scale = as_scale(scale)
    if h.numel() == 0 or h.dtype == torch.float64:  # the kernels cover fp32 / bf16 / fp16
        from .reference import adapter_residual as ref
        return ref(h, y, w_down, b_down, w_shared, b_shared, w_up, b_up, scale, grad_scale)
    params = (w_down, b_down, w_shared, b_shared, w_up, b_up)
    if torch.is_grad_enabled() and (h.requires_grad or y.requires_grad or any(p.requires_grad for p in params)):
        return _AdapterResidual.apply(h, y, w_down, b_down, w_shared, b_shared, w_up, b_up, scale,
                                      bool(grad_scale))
    return _forward(h, y, params, scale, False)[0]
