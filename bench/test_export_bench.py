"""Deployment throughput: the torch classifier vs its exported forms, one group per method.

Group `export-<method>`, variants (extra_info["variant"]):
  baseline     the torch eager classifier, fp32 (`model.classifier()`, the default kernels)
  onnxruntime  the exported ONNX file under onnxruntime (CPU; CUDA provider when installed)
  tensorrt     the TensorRT engine (fp16, normalisation in fp32; CUDA + TensorRT only)
  bf16         the torch eager classifier under bf16 autocast (CUDA only)
  compile      torch.compile of the reference-path classifier, bf16 autocast (CUDA; CPU with
               FASTPROMPT_BENCH_COMPILE=1)
Every variant records its top-1 agreement with the baseline and its max relative error on the
same images (extra_info `top1_agreement`, `max_rel_err`).

On CUDA: ViT-B/16 (random init, seed 0), batch 64, 100 classes, 224 px. On a CPU: the tiny
backbone, batch 8, 32 px (a smoke run in seconds, not a measurement).
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest
import torch

import fastprompt as fp

METHODS = ["coop", "maple", "mma"]
VARIANTS = ["baseline", "onnxruntime", "tensorrt", "bf16", "compile"]
N_CLASSES = 100


def workload(cuda: bool) -> dict:
    if cuda:
        return {"backbone": "ViT-B-16", "batch": 64, "image": 224}
    return {"backbone": "tiny", "batch": 8, "image": 32}


@functools.lru_cache(maxsize=None)
def backbone(cuda: bool):
    return fp.load_clip(workload(cuda)["backbone"], pretrained=None, seed=0, device="cuda" if cuda else "cpu")


def silent(*_args, **_kwargs):
    pass


class Artifacts:
    """Models, ONNX files and engines, built once per method for the whole module."""

    def __init__(self, root, cuda: bool):
        self.root, self.cuda, self._cache = root, cuda, {}

    def _once(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def model(self, method: str):
        def make():
            torch.manual_seed(0)
            model = fp.create(method, backbone(self.cuda), [f"object number {i}" for i in range(N_CLASSES)])
            with torch.no_grad():  # learned-looking prompts/adapters, not their init
                for p in model.trainable_state().values():
                    p.add_(torch.randn_like(p) * 0.02)
            return model.eval()
        return self._once(("model", method), make)

    def images(self) -> torch.Tensor:
        w = workload(self.cuda)
        x = torch.randn(w["batch"], 3, w["image"], w["image"], generator=torch.Generator().manual_seed(0))
        return x.to("cuda" if self.cuda else "cpu")

    def reference(self, method: str) -> torch.Tensor:
        def make():
            with torch.no_grad():
                return self.model(method).classifier()(self.images()).float()
        return self._once(("ref", method), make)

    def onnx(self, method: str):
        from fastprompt.export import export_onnx

        return self._once(("onnx", method), lambda: export_onnx(
            self.model(method), self.root / f"{method}.onnx", log=silent).path)

    def engine(self, method: str):
        from fastprompt.export import build_engine

        def make():
            batch, plan = workload(self.cuda)["batch"], self.root / f"{method}.plan"
            build_engine(self.onnx(method), plan, (1, batch, batch),
                         timing_cache=self.root / "shared.timing.cache", log=silent)
            return plan
        return self._once(("plan", method), make)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, env):
    return Artifacts(tmp_path_factory.mktemp("export_bench"), env.cuda)


def variant_fn(variant: str, method: str, arts: Artifacts, bench):
    """(callable running one batch, dtype label, extra info) for a variant, or pytest.skip."""
    env, x = bench.env, arts.images()
    if variant == "baseline":
        clf = arts.model(method).classifier()
        return lambda: clf(x), "float32", {}
    if variant == "onnxruntime":
        import onnxruntime as ort

        from fastprompt.export import OnnxRunner

        device = "cuda" if env.cuda and "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
        runner, x_np = OnnxRunner(arts.onnx(method), device=device), x.cpu().numpy()
        return lambda: runner.run(x_np), "float32", {"provider": runner.session.get_providers()[0]}
    if variant == "tensorrt":
        if not env.cuda:
            pytest.skip("TensorRT needs CUDA")
        from fastprompt.export import ExportError, TensorRTRunner
        from fastprompt.export.tensorrt import require_tensorrt
        try:
            require_tensorrt()
        except ExportError as err:
            pytest.skip(str(err))
        runner = TensorRTRunner(arts.engine(method))
        return lambda: runner.run(x), "fp16 (normalisation fp32)", {}
    if variant == "bf16":
        if not env.cuda:
            pytest.skip("bf16 autocast is a CUDA variant (CPU bf16 is not a deployment path)")
        clf = arts.model(method).classifier()

        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return clf(x)
        return run, "bfloat16", {}
    bench.skip_unless("compile")
    clf = bench.compiled(arts.model(method).classifier().use_reference_kernels())
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if env.cuda else contextlib.nullcontext()

    def run():
        with amp:
            return clf(x)
    return run, "bfloat16" if env.cuda else "float32", {}


def agreement(out, ref: torch.Tensor) -> dict:
    out = torch.as_tensor(np.asarray(out) if isinstance(out, np.ndarray) else out).float().cpu()
    ref = ref.cpu()
    return {"top1_agreement": float((out.argmax(1) == ref.argmax(1)).float().mean()),
            "max_rel_err": float((out - ref).abs().max() / ref.abs().max())}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method", METHODS)
def test_export_inference(benchmark, bench, artifacts, method, variant):
    benchmark.group = f"export-{method}"
    fn, dtype, info = variant_fn(variant, method, artifacts, bench)
    with torch.no_grad():
        quality = agreement(fn(), artifacts.reference(method))
        x = artifacts.images()
        bench.run(fn, variant=variant, shapes={"images": tuple(x.shape)}, bytes_moved=0)
    benchmark.extra_info.update(dtype=dtype, method=method, images=x.shape[0], classes=N_CLASSES,
                                backbone=workload(bench.env.cuda)["backbone"], **quality, **info)
    if variant in ("baseline", "onnxruntime"):  # fp32 paths: the same classifier
        assert quality["top1_agreement"] == 1.0 and quality["max_rel_err"] < 1e-3
