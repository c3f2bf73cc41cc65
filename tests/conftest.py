import os

import pytest
import torch

# Triton kernels run in the Triton interpreter on CPU-only machines. This must happen before any
# module imports triton.language (its @jit helpers pick interpreter mode at import time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def parity_clip(tmp_path_factory):
    """The parity ViT-B/16 of ../shared/parity (golden_common.make_parity_clip), built once for
    every golden module of the session."""
    from golden_common import make_parity_clip, require_parity

    require_parity()
    return make_parity_clip(tmp_path_factory.mktemp("parity"))


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test (runs compared tensor by tensor block their
    matmuls alike)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
