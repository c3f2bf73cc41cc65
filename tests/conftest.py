import os

import torch

# Triton kernels run in the Triton interpreter on CPU-only machines. This must happen before any
# module imports triton.language (its @jit helpers pick interpreter mode at import time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
