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


def make_configure(overrides: dict, plan):
    """The ``configure(**overrides)`` of one kernel file: replaces its block-size overrides
    (no arguments: back to the heuristics) and clears its cached launch plans."""
    def configure(**new) -> None:
        overrides.clear()
        overrides.update(new)
        plan.cache_clear()
    configure.__doc__ = "Override the block-size heuristics (``configure()`` resets); clears the plan cache."
    return configure
