"""Fused kernels of fastprompt: Triton on CUDA, pure-torch references elsewhere.

``adapter_residual`` and ``insert_prompts_layernorm`` dispatch per call (see ``dispatch``);
``reference`` holds the pure-torch versions with identical signatures (what export traces).
Importing this package imports neither triton nor any kernel module.
"""
from .dispatch import (
    adapter_residual,
    backend_for,
    insert_prompts_layernorm,
    launch_counts,
    reset_launch_counts,
    use,
)

__all__ = [
    "adapter_residual",
    "insert_prompts_layernorm",
    "use",
    "backend_for",
    "launch_counts",
    "reset_launch_counts",
]
