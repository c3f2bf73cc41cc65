"""Triton helpers shared by the kernel files (imported only with them, never by the package)."""
import triton
import triton.language as tl


@triton.jit
def _cvt(x, dtype: tl.constexpr, EMU: tl.constexpr):
    """x.to(dtype), rounding to nearest even. EMU (interpreter): its fp32 -> bf16 cast truncates,
    so the fp32 bits are rounded first (the GPU's cvt.rn does the same in one instruction)."""
    if EMU and dtype == tl.bfloat16:
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        x = b.to(tl.float32, bitcast=True)
    return x.to(dtype)
