"""The training loop: recipe schedule, mixed precision, per-epoch atomic checkpoints, resume, DDP.

A run directory gets, after every epoch, `checkpoint.safetensors` (trainable tensors + SGD
momentum + the epoch, one atomic file) and the adapter files of `fastprompt.save`, so a run that
dies loses at most the epoch in flight and `resume=True` continues from the last finished epoch.
Data order and augmentation are seeded per (seed, epoch), which makes CPU runs reproducible and
resumed runs identical to uninterrupted ones.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from .checkpoint import CheckpointError, check_finite, read_safetensors, save
from .data import ImageDataset, train_transform
from .errors import TrainingError
from .files import append_line, atomic_write
from .recipes import Recipe
from .runtime import TrainEnv, autocast, init_distributed, loader_kwargs  # noqa: F401 (re-exported)

CHECKPOINT = "checkpoint.safetensors"
SYNC_EVERY = 20  # steps between host reads of the running loss / NaN flag
PROGRESS_EVERY_S = 5.0  # seconds between progress lines when stderr is not a terminal
LOG = "log.jsonl"


class LossModule(nn.Module):
    """forward = the method's objective, so DistributedDataParallel sees the training call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, labels):
        loss, logits = self.model.loss_and_logits(images, labels)
        return loss, logits.detach()


class GraphedStep:
    """The step's forward and backward captured once as CUDA graphs and replayed
    (torch.cuda.make_graphed_callables): the same kernels, without a CPU launch per op, which is
    what bounds small-batch prompt tuning on a GPU. Exact. Needs fixed batch shapes (training
    batches are, the loader drops the partial last one) and one process; a batch of another shape
    runs eagerly, and a capture that fails falls back to eager with a message."""

    def __init__(self, module: nn.Module, env: "TrainEnv", log=print):
        self.module, self.env, self.log = module, env, log
        self.graphed, self.shape, self.failed = None, None, False

    def __call__(self, images, labels):
        if self.graphed is None and not self.failed:
            try:
                with autocast(self.env.device, self.env.precision, cache=False):
                    self.graphed = torch.cuda.make_graphed_callables(self.module, (images, labels))
                self.shape = (images.shape, labels.shape)
            except Exception as err:  # noqa: BLE001 - any capture problem means: run eagerly
                self.failed = True
                self.log(f"CUDA graphs off ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                         f"training eagerly")
        if self.graphed is not None and (images.shape, labels.shape) == self.shape:
            return self.graphed(images, labels)
        return self.module(images, labels)


def make_step(model, env: "TrainEnv", log=print):
    """Callable (images, labels) -> (loss, logits) for one training step: eager, DDP, or (CUDA,
    one process, `env.cuda_graphs`) replayed as a CUDA graph."""
    step = LossModule(model)
    if env.world_size > 1:
        ids = [env.device.index] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(step, device_ids=ids)
    if env.cuda_graphs and env.device.type == "cuda":
        return GraphedStep(step, env, log)
    return step


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def save_checkpoint(model, optimizer, run_dir: Path, epoch: int, extra: dict) -> None:
    """The epoch's checkpoint and adapter files, each written atomically; parameters or momentum
    holding NaN/inf stop training instead (the previous epoch's files stay as they are)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, p in model.trainable_state().items():
        tensors[f"param/{name}"] = p.detach().cpu().contiguous()
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"momentum/{name}"] = buf.detach().cpu().contiguous()
    try:
        check_finite(tensors, f"the model after epoch {epoch}")
    except CheckpointError as err:
        raise TrainingError(f"{err}; epoch {epoch} was not saved, the files of epoch {epoch - 1} in "
                            f"{run_dir} are intact") from None
    meta = {"epoch": str(epoch)}
    atomic_write(run_dir / CHECKPOINT, lambda p: save_file(tensors, str(p), metadata=meta))
    save(model, run_dir, extra=extra)


def load_checkpoint(model, optimizer, run_dir: Path) -> int:
    """Restore trainable tensors and momentum; return the number of finished epochs."""
    from safetensors import safe_open

    from .errors import short_repr as short

    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise TrainingError(f"nothing to resume: no {CHECKPOINT} in {run_dir} (drop --resume)")
    tensors = read_safetensors(path, "the run")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    epoch = meta.get("epoch", "")
    if not epoch.isdigit():
        raise CheckpointError(f"{path} records no finished epoch (metadata {short(meta)}): restore "
                              f"it or start a new run")
    own = model.trainable_state()
    missing = [k for k in own if f"param/{k}" not in tensors]
    if missing:
        raise TrainingError(f"{path} lacks '{missing[0]}': it belongs to another method/config")
    for name, p in own.items():
        for key in (f"param/{name}", f"momentum/{name}"):
            if key in tensors and tensors[key].shape != p.shape:
                raise CheckpointError(f"'{key}' in {path} has shape {tuple(tensors[key].shape)}, "
                                      f"the model's is {tuple(p.shape)}: another method/config")
    check_finite(tensors, path)
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(tensors[f"param/{name}"])
            if f"momentum/{name}" in tensors:
                optimizer.state[p]["momentum_buffer"] = tensors[f"momentum/{name}"].to(p.device)
    return int(epoch)


def make_optimizer(model, recipe: Recipe) -> torch.optim.Optimizer:
    params = list(model.trainable_state().values())
    if not params:
        raise TrainingError(f"method '{model.name}' has nothing to train: use --epochs 0")
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                           weight_decay=recipe.weight_decay)


def train(model, recipe: Recipe, data: list, run_dir: Path, env: TrainEnv, resume: bool = False,
          extra: dict | None = None, log=print, progress=None) -> dict:
    """Tune `model` on `data` (list of Datum) following `recipe`; returns throughput stats. `log`
    gets a line per epoch; `progress` (callable or None) a line every PROGRESS_EVERY_S s within an
    epoch where stderr is no terminal (a terminal gets tqdm's bar); neither if `env.progress` is off."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if recipe.epochs == 0:  # zero-shot, or an evaluation of the initial prompts: nothing to tune
        if env.main:
            save(model, run_dir, extra=extra or {})
        model.eval()
        return {"train_images_per_s": 0.0, "train_wall_s": 0.0, "epochs": 0, "skipped_images": 0}
    optimizer = make_optimizer(model, recipe)
    start = load_checkpoint(model, optimizer, run_dir) if resume else 0
    if resume:
        log(f"resuming {run_dir} after epoch {start}/{recipe.epochs}")
    step_fn = make_step(model, env, log)
    scaler = torch.amp.GradScaler(env.device.type, enabled=env.precision == "fp16")
    dataset = ImageDataset(data, train_transform(model.clip.image_size, model.clip.mean,
                                                 model.clip.std), on_error=env.on_error,
                           image_size=model.clip.image_size)
    if len(dataset) < recipe.batch_size * env.world_size:
        raise TrainingError(f"{len(dataset)} training images are fewer than one batch of "
                            f"{recipe.batch_size}: lower --batch-size or raise --shots")
    images_seen, train_time = 0, 0.0
    model.train()
    for epoch in range(start, recipe.epochs):
        lr = recipe.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(epoch_seed(env.seed, epoch))
        loader = _loader(dataset, recipe.batch_size, env, epoch)
        stats = _run_epoch(step_fn, model, optimizer, scaler, loader, env, epoch, recipe, run_dir, progress)
        images_seen += stats["images"]
        train_time += stats["wall_s"]
        if env.main:
            save_checkpoint(model, optimizer, run_dir, epoch + 1, extra or {})
            entry = {"epoch": epoch + 1, "lr": lr, **stats}
            append_line(run_dir / LOG, json.dumps(entry, allow_nan=False))
            log(f"epoch {epoch + 1}/{recipe.epochs}  lr {lr:.2e}  loss {stats['loss']:.4f}  "
                f"acc {stats['acc']:.1f}%  {stats['images_per_s']:.1f} img/s")
    if env.main and recipe.epochs == start:
        save(model, run_dir, extra=extra or {})
    skipped = dataset.skipped  # over all loader workers (shared flags); this process's share in DDP
    if skipped and env.main:
        log(f"skipped {len(skipped)} unreadable training image(s), each replaced by another of its "
            f"class (first: {skipped[0]})")
    model.eval()
    return {"train_images_per_s": images_seen * env.world_size / train_time if train_time else 0.0,
            "train_wall_s": train_time, "epochs": recipe.epochs, "skipped_images": len(skipped)}


def _loader(dataset, batch_size: int, env: TrainEnv, epoch: int) -> DataLoader:
    g = torch.Generator().manual_seed(epoch_seed(env.seed, epoch))
    if env.world_size > 1:
        sampler = DistributedSampler(dataset, env.world_size, env.rank, shuffle=True,
                                     seed=env.seed, drop_last=True)
        sampler.set_epoch(epoch)
        return DataLoader(dataset, batch_size, sampler=sampler, drop_last=True, generator=g,
                          **loader_kwargs(env.device, env.workers))
    return DataLoader(dataset, batch_size, shuffle=True, drop_last=True, generator=g,
                      **loader_kwargs(env.device, env.workers))


def _run_epoch(step_fn, model, optimizer, scaler, loader, env, epoch, recipe, run_dir,
               progress=None) -> dict:
    from tqdm.auto import tqdm

    shown, terminal = env.progress and env.main, sys.stderr.isatty()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{recipe.epochs}", leave=False,
               disable=not (shown and terminal))
    lines = progress if shown and not terminal else None  # a log file: a line every few seconds
    # running sums stay on the device; the host reads them every SYNC_EVERY steps (no per-step sync)
    total_loss = torch.zeros((), device=env.device)
    correct = torch.zeros((), dtype=torch.long, device=env.device)
    finite = torch.ones((), dtype=torch.bool, device=env.device)
    seen, t0, last = 0, time.perf_counter(), 0
    due = t0 + PROGRESS_EVERY_S
    for step, (images, labels) in enumerate(bar):
        images = images.to(env.device, non_blocking=True)
        labels = labels.to(env.device, non_blocking=True)
        with autocast(env.device, env.precision):
            loss, logits = step_fn(images, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        n = labels.numel()
        finite &= torch.isfinite(loss.detach())
        total_loss += loss.detach().float() * n
        correct += (logits.argmax(-1) == labels).sum()
        seen += n
        now = time.perf_counter()
        line_due = lines is not None and now >= due and step + 1 < len(loader)
        if step + 1 - last >= SYNC_EVERY or step + 1 == len(loader) or line_due:
            _check_finite(finite, epoch, last + 1, step + 1, run_dir)
            last = step + 1
            loss_now, acc_now, rate = float(total_loss) / seen, 100 * int(correct) / seen, seen / (now - t0)
            bar.set_postfix(loss=f"{loss_now:.3f}", acc=f"{acc_now:.1f}", img_s=f"{rate:.1f}")
            if line_due:
                left = (len(loader) - step - 1) * (now - t0) / (step + 1)
                lines(f"epoch {epoch + 1}/{recipe.epochs}  step {step + 1}/{len(loader)}  loss "
                      f"{loss_now:.4f}  acc {acc_now:.1f}%  {rate:.1f} img/s  ~{left:.0f} s left "
                      f"in this epoch")
                due = now + PROGRESS_EVERY_S
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    wall = time.perf_counter() - t0
    if seen == 0:
        raise TrainingError("the training loader produced no batch: lower --batch-size")
    return {"loss": float(total_loss) / seen, "acc": 100.0 * int(correct) / seen, "images": seen,
            "wall_s": wall, "images_per_s": seen / wall}


def _check_finite(finite: torch.Tensor, epoch: int, first: int, last: int, run_dir) -> None:
    if not bool(finite):
        raise TrainingError(f"the loss became NaN/inf in epoch {epoch + 1} (steps {first}-{last}): "
                            f"lower --lr or use --precision fp32; the checkpoint of epoch {epoch} in "
                            f"{run_dir} is intact (--resume continues from it)")
