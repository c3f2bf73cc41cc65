"""What every golden test shares: where the parity data are (`$FASTPROMPT_PARITY`, else
`<repo>/../shared/parity`), reading one golden run, the README's tolerances and the parity
ViT-B/16 (`parity_clip`, a session fixture in conftest.py: built once for every golden module).

A golden module starts with `require_parity()` (skips the module, saying why, where the folder is
absent; fails under `CI`) and `pytestmark = pytest.mark.golden`.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

import fastprompt as fp

LOGIT_ATOL = LOSS_ATOL = 1e-4
GRAD_RTOL = 1e-3          # max|Δgrad| <= GRAD_RTOL * max|grad|, per tensor
FEATURE_ATOL = 1e-4       # diagnostics: which tower disagrees


def parity_dir() -> Path:
    env = os.environ.get("FASTPROMPT_PARITY")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "parity"


PARITY = parity_dir()


def require_parity() -> None:
    """Skip the calling module (at import) where the parity data are absent; fail under CI."""
    if (PARITY / "make_weights.py").is_file():
        return
    reason = (f"golden parity data not found at {PARITY}: set FASTPROMPT_PARITY to the shared/parity "
              f"folder to run these tests")
    if os.environ.get("CI"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)


@functools.lru_cache(maxsize=None)
def golden(name: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    return load_file(str(PARITY / f"{name}.safetensors")), json.loads((PARITY / f"{name}.json").read_text())


def rel_grad_gap(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max|Δgrad| / max|grad| (the README's per-tensor measure)."""
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def make_parity_clip(tmp_dir: Path):
    """The parity ViT-B/16, built from its regenerated OpenAI-layout checkpoint as a user would.
    The file is a plain state dict, which cannot say it holds OpenAI-style (QuickGELU) weights, so
    the user says it (`quick_gelu=True`, what load_clip's warning asks for; README, "The backbone's
    MLP activation"). The 600 MB file is deleted once loaded."""
    spec = importlib.util.spec_from_file_location("parity_make_weights", PARITY / "make_weights.py")
    make_weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_weights)
    state = make_weights.make_state_dict(seed=0)
    expected = golden("coop")[1]["weights"]["sha256_fingerprint"]
    assert make_weights.fingerprint(state) == expected, "regenerated parity weights differ from the recorded ones"
    path = tmp_dir / "clip_vitb16_seed0.pt"
    torch.save(state, path)
    del state
    try:
        return fp.load_clip("ViT-B-16", pretrained=str(path), quick_gelu=True)
    finally:
        path.unlink()
