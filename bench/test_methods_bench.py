"""Inference and training throughput per method: the original-style baseline vs fastprompt.

baseline   = the same model with every optimisation off (`set_fast(False)`): 77 text tokens,
             the text tower rerun on every batch, `torch.cat` insertion, unfused adapters, no caches;
             PromptSRC's frozen image features from a second copy of the image tower, as released
fastprompt = the defaults: `model.classifier()` for inference (cached text, one image pass), the
             text shortcut / kernels / caches for training
clip-image-only = open_clip's own `encode_image` + one matmul: the ceiling for inference
             (CLIP-LoRA's classifier runs merged weights: it should cost exactly this)

On CUDA: ViT-B/16 (random init), bf16 autocast, batch 100, C = 100 and 1000 classes; training at
C = 500 base classes with each method's original batch size. On a CPU: the tiny backbone, fp32,
batch 16, C = 20 and 200, training at C = 20 (a smoke-sized run of the same comparisons).
"""
from __future__ import annotations

import functools
import gc

import pytest
import torch
import torch.nn.functional as F

import fastprompt as fp
from fastprompt.backbone import NO_HOOKS
from fastprompt.recipes import RECIPES
from fastprompt.training import LossModule, TrainEnv, make_step

INFER_METHODS = ["coop", "maple", "ivlp", "mma", "maple+lamm", "clip_lora"]
TRAIN_METHODS = ["coop", "cocoop", "maple", "ivlp", "mma", "lamm", "maple+lamm", "promptsrc", "kgcoop",
                 "clip_lora"]


@functools.lru_cache(maxsize=None)
def backbone(cuda: bool):
    name = "ViT-B-16" if cuda else "tiny"
    return fp.load_clip(name, pretrained=None, seed=0, device="cuda" if cuda else "cpu")


def workload(env) -> dict:
    if env.cuda:
        return {"batch": 100, "classes": (100, 1000), "train_classes": 500, "image": 224}
    return {"batch": 16, "classes": (20, 200), "train_classes": 20, "image": 32}


def classnames(n: int) -> list[str]:
    return [f"object number {i}" for i in range(n)]


def images(env, batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(env.device)


def amp(env):
    return torch.autocast(env.device.type, dtype=env.dtype, enabled=env.cuda)


def note(benchmark, **info):
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("n_classes_index", [0, 1], ids=["few-classes", "many-classes"])
@pytest.mark.parametrize("variant", ["baseline", "fastprompt", "clip-image-only"])
@pytest.mark.parametrize("method", INFER_METHODS)
def test_inference(benchmark, bench, method, variant, n_classes_index):
    env, w = bench.env, workload(bench.env)
    n = w["classes"][n_classes_index]
    benchmark.group = f"inference-{method}-C{n}"
    clip = backbone(env.cuda)
    x = images(env, w["batch"], w["image"])
    torch.manual_seed(0)
    model = fp.create(method, clip, classnames(n)).eval()
    if variant == "baseline":
        model.set_fast(False)
        fn = model
    elif variant == "fastprompt":
        with amp(env):
            fn = model.classifier()
    else:
        with torch.no_grad(), amp(env):
            text = model.classifier().text_features
        scale = clip.model.logit_scale.exp()

        def fn(images):
            return scale * F.normalize(clip.model.encode_image(images), dim=-1) @ text.t()

    def step():
        with torch.no_grad(), amp(env):
            return fn(x)

    bench.run(step, variant=variant, shapes={"images": tuple(x.shape)}, bytes_moved=0)
    note(benchmark, classes=n, images=w["batch"], method=method)


@pytest.mark.parametrize("variant", ["baseline", "fastprompt", "fastprompt-text-chunk"])
@pytest.mark.parametrize("method", TRAIN_METHODS)
def test_train_step(benchmark, bench, method, variant):
    """fastprompt-text-chunk: the defaults plus ``text_chunk`` (checkpointed text tower, a fifth of
    the classes at a time): the memory it saves (``peak_mib`` on CUDA) and the time it costs."""
    env, w = bench.env, workload(bench.env)
    n = w["train_classes"]
    batch = RECIPES[method].batch_size
    benchmark.group = f"train-{method}"
    clip = backbone(env.cuda)
    torch.manual_seed(0)
    chunk = n // 5 if variant == "fastprompt-text-chunk" else 0
    model = fp.create(method, clip, classnames(n), text_chunk=chunk).train()
    if variant == "baseline":
        model.set_fast(False)
        if method == "promptsrc":  # the released code: a second, prompt-free image tower in memory
            second_tower(model)
    x = images(env, batch, w["image"])
    y = torch.arange(batch, device=env.device) % n
    opt = torch.optim.SGD(model.trainable_state().values(), lr=1e-4, momentum=0.9)
    # the trainer's own step: CUDA-graph replay on a GPU for fastprompt, eager for the baseline
    train_env = TrainEnv(device=env.device, precision="bf16" if env.cuda else "fp32",
                         cuda_graphs=variant != "baseline")
    loss_fn = make_step(model, train_env)

    def step():
        opt.zero_grad(set_to_none=True)
        with amp(env):
            loss, _ = loss_fn(x, y)
        loss.backward()
        opt.step()
        return loss

    # FLOPs of the work itself: text_chunk's recomputation is overhead, not counted
    counted = model if not chunk else fp.create(method, clip, classnames(n)).train()
    flops = count_flops(LossModule(counted), x, y, env)
    del counted
    if env.cuda:  # peak over this step's warm-up, capture and replays, above what was live before
        gc.collect()   # earlier tests' graphed steps hold reference cycles
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        live = torch.cuda.memory_allocated()
    bench.run(step, variant=variant, shapes={"images": tuple(x.shape)}, bytes_moved=0)
    note(benchmark, classes=n, images=batch, method=method, flops=flops, text_chunk=chunk,
         cuda_graph=getattr(loss_fn, "graphed", None) is not None and not getattr(loss_fn, "failed", False))
    if env.cuda:
        note(benchmark, peak_mib=round((torch.cuda.max_memory_allocated() - live) / 2 ** 20, 1))


def second_tower(model) -> None:
    """PromptSRC as released (trainers/promptsrc.py): the frozen image features v0 come from
    `ZS_image_encoder`, a separate copy of the image tower run by its own forward, instead of the
    backbone with the slots off."""
    import copy

    tower = copy.deepcopy(model.clip.model.visual).requires_grad_(False)
    model.teacher_image = lambda images: tower(images)


def count_flops(step, x, y, env) -> int:
    """FLOPs of one eager forward + backward (matmuls and attention, as torch counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, amp(env):
        step(x, y)[0].backward()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------- heads on frozen features
HEAD_METHODS = ["tip_adapter_f", "clip_adapter"]


def head_model(method: str, clip, n: int, env):
    """A head with what training gives it first: Tip-Adapter-F a cache of 16 images per class."""
    torch.manual_seed(0)
    model = fp.create(method, clip, classnames(n))
    if method == "tip_adapter_f":
        size = clip.image_size
        feats = torch.cat([model.encode(images(env, 100, size)) for _ in range(-(-16 * n // 100))])
        model.build_cache(feats[:16 * n], torch.arange(n, device=env.device).repeat(16))
    return model.train()


@pytest.mark.parametrize("variant", ["baseline", "fastprompt"])
@pytest.mark.parametrize("method", HEAD_METHODS)
def test_head_train_step(benchmark, bench, method, variant):
    """One training step of a head: the batch's fresh crops through the frozen tower (no graph),
    the head, its loss and the optimiser. The baseline recomputes what the release recomputes:
    CLIP-Adapter re-encodes the class prompts on every forward (clip_adapter.py TextEncoder);
    Tip-Adapter-F computes its classifier once (main.py clip_classifier), so its baseline differs
    from fastprompt only in the switches that do not touch it."""
    import dataclasses

    from fastprompt.optim import make_optimizer
    from fastprompt.recipes import recipe_for

    env, w = bench.env, workload(bench.env)
    n = w["train_classes"]
    recipe = recipe_for(method)
    batch = recipe.batch_size if env.cuda else 16
    benchmark.group = f"train-{method}"
    model = head_model(method, backbone(env.cuda), n, env)
    if variant == "baseline":
        model.set_fast(False)
        if method == "tip_adapter_f":  # main.py's clip_weights: computed once
            model.runtime = dataclasses.replace(model.runtime, cache=True)
    opt = make_optimizer(model, recipe)
    x = images(env, batch, w["image"])
    y = torch.arange(batch, device=env.device) % n

    def step():
        opt.zero_grad(set_to_none=True)
        with amp(env):
            loss = model.loss(x, y)
        loss.backward()
        opt.step()
        return loss

    bench.run(step, variant=variant, shapes={"images": tuple(x.shape)}, bytes_moved=0)
    note(benchmark, classes=n, images=batch, method=method)


def release_search(features, labels, text, keys, key_labels, betas, alphas):
    """utils.py search_hp's loop: every grid point recomputes the affinity, the zero-shot logits
    and the cache term (with the one-hot values' matmul)."""
    import torch.nn.functional as F

    values = F.one_hot(key_labels, text.shape[0]).to(features.dtype)
    correct = []
    for beta in betas:
        for alpha in alphas:
            affinity = features @ keys.t()
            cache_logits = ((-1) * (beta - beta * affinity)).exp() @ values
            clip_logits = 100. * features @ text.t()
            tip_logits = clip_logits + cache_logits * alpha
            correct.append(int((tip_logits.argmax(-1) == labels).sum()))
    return correct


@pytest.mark.parametrize("variant", ["baseline", "fastprompt"])
def test_tip_search(benchmark, bench, variant):
    """Tip-Adapter's α/β search over the released 200 x 20 grid on validation features: the
    release's loop of 4,000 evaluations vs fastprompt's vectorised search (`tip_search.grid_correct`:
    the same counts at every point, tested). CUDA: 500 classes x 16 shots, 2,000 validation images
    (4 a class, CoOp's few-shot split), fp32; CPU: 20 classes x 16 shots, 80 images."""
    import torch.nn.functional as F

    from fastprompt.methods.tip_search import grid, grid_correct

    env = bench.env
    n, shots, per_class, dim = (500, 16, 4, 512) if env.cuda else (20, 16, 4, 32)
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(n, dim, generator=g)
    key_labels = torch.arange(n).repeat_interleave(shots)
    labels = torch.arange(n).repeat_interleave(per_class)

    def noisy(rows):
        return F.normalize(protos[rows] + 1.5 * torch.randn(len(rows), dim, generator=g), dim=-1).to(env.device)
    keys, text, feats = noisy(key_labels), noisy(torch.arange(n)), noisy(labels)
    key_labels, labels = key_labels.to(env.device), labels.to(env.device)
    betas, alphas = grid(7, 200), grid(3, 20)
    benchmark.group = "tip-search"
    fn = release_search if variant == "baseline" else grid_correct
    bench.run(lambda: fn(feats, labels, text, keys, key_labels, betas, alphas), variant=variant,
              shapes={"val": (len(labels), dim), "keys": (len(key_labels), dim)}, bytes_moved=0, warmup=1)
    note(benchmark, classes=n, shots=shots, val_images=len(labels), grid=len(betas) * len(alphas))


@pytest.mark.parametrize("variant", ["baseline", "fastprompt", "frozen-tower"])
def test_lora_branch_overhead(benchmark, bench, variant):
    """What CLIP-LoRA's unfused low-rank branches cost in a training step of the image tower (batch
    32, dropout 0.25, q/k/v of every block): forward + backward through the frozen tower with the
    gradient taken into the images and no deltas (`frozen-tower`: the floor of any kernel fusing
    the branch into the qkv projection), with the deltas on the fast path (`fastprompt`: fused qkv
    + one skinny matmul each way), and the release's way (`baseline`: B@A formed, one Linear per
    projection, kernels off). The fast path's time over the floor is all a fusion could win."""
    env, w = bench.env, workload(bench.env)
    benchmark.group = "lora-branch-overhead"
    torch.manual_seed(0)
    model = fp.create("clip_lora", backbone(env.cuda), classnames(2)).train()
    model.set_fast(variant != "baseline")
    x = images(env, 32, w["image"]).requires_grad_(variant == "frozen-tower")

    def step():
        hooks = NO_HOOKS if variant == "frozen-tower" else model.image_hooks()
        with amp(env):
            feats = model.backbone.encode_image(x, hooks, model.opts)
        feats.float().sum().backward()

    bench.run(step, variant=variant, shapes={"images": tuple(x.shape)}, bytes_moved=0)
    note(benchmark, images=32, method="clip_lora")
