"""The training loop: recipe schedule, mixed precision, per-epoch atomic checkpoints, resume, DDP.

A run directory gets, after every epoch, `checkpoint.safetensors` (trainable tensors + optimiser
state + the method's training state + the epoch and step, one atomic file) and the adapter files of `fastprompt.save`, so a run that
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

from .checkpoint import save
from .context import TrainingContext, epoch_seed
from .data import ImageDataset, train_transform
from .errors import TrainingError, setting
from .files import append_line
from .optim import make_optimizer
from .recipes import Recipe
from .resume import CHECKPOINT, LOG, drop_log_after, load_checkpoint, save_checkpoint  # noqa: F401
from .runtime import TrainEnv, autocast, init_distributed, loader_kwargs  # noqa: F401 (re-exported)

SYNC_EVERY = 20  # steps between host reads of the running loss / NaN flag
PROGRESS_EVERY_S = 5.0  # seconds between progress lines when stderr is not a terminal
MAX_EPOCH_LINES = 100  # a run of more epochs (a step budget over a small set) prints every k-th


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
    batches are: the loader drops the partial last one, or there is one batch) and one process;
    a batch of another shape runs eagerly, and a capture that fails falls back to eager with a
    message."""

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


def train(model, recipe: Recipe, data: list, run_dir: Path, env: TrainEnv, resume: bool = False,
          extra: dict | None = None, log=print, progress=None, val: list | None = None) -> dict:
    """Tune `model` on `data` (list of Datum) following `recipe`; returns throughput stats. `log`
    gets a line per epoch; `progress` (callable or None) a line every PROGRESS_EVERY_S s within an
    epoch where stderr is no terminal (a terminal gets tqdm's bar); neither if `env.progress` is off.
    `val` (list of Datum) is there for methods that choose something on it (Tip-Adapter's α, β).
    One run alone; `fastprompt.sweep` steps several `Trainer`s together."""
    trainer = Trainer(model, recipe, data, run_dir, env, resume, extra, log, val)
    if not trainer.done:
        step_fn = make_step(model, env, log)
        scaler = torch.amp.GradScaler(env.device.type, enabled=env.precision == "fp16")
        while not trainer.done:
            stats = _run_epoch(step_fn, trainer, scaler, trainer.loader(), trainer.epoch, progress)
            trainer.end_epoch(stats)
    return trainer.finish()


class Trainer:
    """One run's training: what happens before its first step, at each step's rate, after each
    epoch and after its last. `train` drives one; `fastprompt.sweep` drives several in one pass.

    The method takes part through four hooks (`methods.base.Method`): `begin_training(context)`
    before the first step (a training-free method does its whole work there), `end_epoch` after
    each epoch's last step (PromptSRC's snapshots), `end_training(context)` after the last epoch,
    and `training_state()` / `load_training_state()` for what a resumed run must carry on with.
    The optimiser (SGD or AdamW), its learning rate at every step (per epoch or per iteration) and
    the length of the run (epochs or an optimiser-step budget) all come from `recipe`. After each
    epoch the log line is written first, then the checkpoint (a failed write loses no record)."""

    def __init__(self, model, recipe: Recipe, data: list, run_dir: Path, env: TrainEnv,
                 resume: bool = False, extra: dict | None = None, log=print, val: list | None = None):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.model, self.recipe, self.run_dir, self.env, self.log = model, recipe, run_dir, env, log
        self.extra = extra or {}
        self.context = TrainingContext(model, data, list(val or []), env, recipe)
        self.epoch, self.images, self.wall, self.dataset = 0, 0, 0.0, None
        self.plan = Plan(recipe, 1, 0, 0)
        model.begin_training(self.context)
        if not recipe.trains:  # zero-shot, training-free, or an evaluation of the initial prompts
            return
        self.optimizer = make_optimizer(model, recipe)
        self.dataset = ImageDataset(data, train_transform(model.clip.image_size, model.clip.mean,
                                                          model.clip.std, scale=recipe.crop_scale),
                                    on_error=env.on_error, image_size=model.clip.image_size)
        if not len(self.dataset) or (env.world_size > 1
                                     and len(self.dataset) < recipe.batch_size * env.world_size):
            raise TrainingError(f"{len(self.dataset)} training images are fewer than one batch of "
                                f"{recipe.batch_size} per process: lower {setting('--batch-size')} or "
                                f"raise {setting('--shots')}")
        per_epoch = len(_loader(self.dataset, recipe.batch_size, env, 0))
        self.plan = Plan(recipe, per_epoch, recipe.total_epochs(per_epoch), recipe.total_steps(per_epoch))
        if resume:
            self.epoch, steps = load_checkpoint(model, self.optimizer, run_dir)
            if self.epoch > self.plan.epochs or (steps or 0) > self.plan.total:
                done = f"{self.epoch} finished epochs ({'?' if steps is None else steps} steps)"
                raise TrainingError(
                    f"{run_dir / CHECKPOINT} holds {done}, more than the {self.plan.epochs} "
                    f"({self.plan.total} steps) asked: resume with the run's own --epochs, or start "
                    f"a new run in another --out")
            drop_log_after(run_dir, self.epoch)
            log(f"resuming {run_dir} after epoch {self.epoch}/{self.plan.epochs}")
        self.shown = max(1, self.plan.epochs // MAX_EPOCH_LINES)  # an epoch line every k (and the last)
        model.train()

    @property
    def done(self) -> bool:
        return self.epoch >= self.plan.epochs

    def loader(self) -> DataLoader:
        """This epoch's batches: data order and augmentation seeded by (seed, epoch)."""
        torch.manual_seed(epoch_seed(self.env.seed, self.epoch))
        return _loader(self.dataset, self.recipe.batch_size, self.env, self.epoch)

    def set_lr(self, step: int) -> float:
        """Put the scheduled rate of this epoch's 0-indexed `step` into the optimiser."""
        lr = self.plan.lr(self.epoch, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def end_epoch(self, stats: dict) -> None:
        """After the epoch's last step: the method's hook, the log line, the checkpoint."""
        self.images += stats["images"]
        self.wall += stats["wall_s"]
        self.model.end_epoch(self.epoch, self.plan.epochs)
        self.epoch += 1
        if not self.env.main:
            return
        lrs = stats.pop("lrs")
        entry = {"epoch": self.epoch, "lr": lrs[0], **stats,
                 **({"lrs": lrs} if self.recipe.schedule != "epoch" else {})}
        append_line(self.run_dir / LOG, json.dumps(entry, allow_nan=False))
        if self.epoch % self.shown == 0 or self.done:
            self.log(f"epoch {self.epoch}/{self.plan.epochs}  lr {lrs[0]:.2e}  loss {stats['loss']:.4f}"
                     f"  acc {stats['acc']:.1f}%  {stats['images_per_s']:.1f} img/s")
        save_checkpoint(self.model, self.optimizer, self.run_dir, self.epoch, self.extra,
                        step=min(self.plan.total, self.epoch * self.plan.per_epoch))

    def finish(self) -> dict:
        """After the last epoch: the method's hook, the final files, the throughput."""
        self.model.end_training(self.context)
        if self.env.main:
            save(self.model, self.run_dir, extra=self.extra)  # the final tensors (e.g. GPA's average)
        skipped = self.dataset.skipped if self.dataset is not None else []
        if skipped and self.env.main:  # over all loader workers; this process's share in DDP
            self.log(f"skipped {len(skipped)} unreadable training image(s), each replaced by another "
                     f"of its class (first: {skipped[0]})")
        self.model.eval()
        rate = self.images * self.env.world_size / self.wall if self.wall else 0.0
        return {"train_images_per_s": rate, "train_wall_s": self.wall, "epochs": self.plan.epochs,
                "skipped_images": len(skipped)}


class Plan:
    """Where a run's steps fall: `per_epoch` batches an epoch, `epochs` epochs, `total` optimiser
    steps (fewer than epochs x per_epoch when the recipe sets a step budget), and each step's rate."""

    def __init__(self, recipe: Recipe, per_epoch: int, epochs: int, total: int):
        self.recipe, self.per_epoch, self.epochs, self.total = recipe, per_epoch, epochs, total

    def steps(self, epoch: int) -> int:
        """Optimiser steps of 0-indexed `epoch`."""
        return max(0, min(self.per_epoch, self.total - epoch * self.per_epoch))

    def lr(self, epoch: int, step: int) -> float:
        return self.recipe.lr_at_step(epoch * self.per_epoch + step, self.per_epoch)


def _loader(dataset, batch_size: int, env: TrainEnv, epoch: int) -> DataLoader:
    g = torch.Generator().manual_seed(epoch_seed(env.seed, epoch))
    if env.world_size > 1:
        sampler = DistributedSampler(dataset, env.world_size, env.rank, shuffle=True,
                                     seed=env.seed, drop_last=True)
        sampler.set_epoch(epoch)
        return DataLoader(dataset, batch_size, sampler=sampler, drop_last=True, generator=g,
                          **loader_kwargs(env.device, env.workers))
    # Dassl's rule (build_data_loader): the partial last batch is dropped only when the set holds
    # a full one; fewer images than a batch train as one smaller batch (KgCoOp's 128 on EuroSAT)
    return DataLoader(dataset, batch_size, shuffle=True, drop_last=len(dataset) >= batch_size,
                      generator=g, **loader_kwargs(env.device, env.workers))


class EpochMeter:
    """An epoch's running loss, accuracy and NaN flag, kept on the device; the host reads them
    every SYNC_EVERY steps (no per-step sync)."""

    def __init__(self, device):
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.seen, self.t0, self.checked, self.lrs = 0, time.perf_counter(), 0, []

    def add(self, loss, logits, labels) -> None:
        n = labels.numel()
        self.finite &= torch.isfinite(loss.detach())
        self.loss += loss.detach().float() * n
        self.correct += (logits.argmax(-1) == labels).sum()
        self.seen += n

    def check(self, epoch: int, steps: int, run_dir) -> tuple[float, float, float]:
        """(loss, accuracy, images/s) so far; TrainingError if a loss since the last check was not
        finite."""
        if not bool(self.finite):
            raise TrainingError(f"the loss became NaN/inf in epoch {epoch + 1} (steps {self.checked + 1}-"
                                f"{steps}): lower {setting('--lr')} or use "
                                f"{setting('--precision', 'fp32')}; the checkpoint of epoch "
                                f"{epoch} in {run_dir} is intact (--resume continues from it)")
        self.checked = steps
        rate = self.seen / max(time.perf_counter() - self.t0, 1e-9)
        return float(self.loss) / self.seen, 100 * int(self.correct) / self.seen, rate

    def result(self, device) -> dict:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - self.t0
        if self.seen == 0:
            raise TrainingError("the training loader produced no batch: lower --batch-size")
        return {"loss": float(self.loss) / self.seen, "acc": 100.0 * int(self.correct) / self.seen,
                "images": self.seen, "wall_s": wall, "images_per_s": self.seen / wall, "lrs": self.lrs}


def _run_epoch(step_fn, trainer: Trainer, scaler, loader, epoch: int, progress=None) -> dict:
    """One epoch of one run: `plan.steps(epoch)` optimiser steps, each at its scheduled rate."""
    from tqdm.auto import tqdm

    env, plan, optimizer = trainer.env, trainer.plan, trainer.optimizer
    n_steps = plan.steps(epoch)
    shown, terminal = env.progress and env.main, sys.stderr.isatty()
    # a bar updated by hand: wrapping the loader would make tqdm.auto iterate it twice (its
    # asyncio class calls iter() once more), moving the loader's generator, i.e. the data stream
    bar = tqdm(desc=f"epoch {epoch + 1}/{plan.epochs}", leave=False, total=n_steps,
               disable=not (shown and terminal))
    lines = progress if shown and not terminal else None  # a log file: a line every few seconds
    meter = EpochMeter(env.device)
    due = meter.t0 + PROGRESS_EVERY_S
    for step, (images, labels) in enumerate(loader):
        if step == n_steps:  # the step budget ends inside this epoch
            break
        meter.lrs.append(trainer.set_lr(step))
        images = images.to(env.device, non_blocking=True)
        labels = labels.to(env.device, non_blocking=True)
        with autocast(env.device, env.precision):
            loss, logits = step_fn(images, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        meter.add(loss, logits, labels)
        now = time.perf_counter()
        line_due = lines is not None and now >= due and step + 1 < n_steps
        bar.update()
        if step + 1 - meter.checked >= SYNC_EVERY or step + 1 == n_steps or line_due:
            loss_now, acc_now, rate = meter.check(epoch, step + 1, trainer.run_dir)
            bar.set_postfix(loss=f"{loss_now:.3f}", acc=f"{acc_now:.1f}", img_s=f"{rate:.1f}")
            if line_due:
                left = (n_steps - step - 1) * (now - meter.t0) / (step + 1)
                lines(f"epoch {epoch + 1}/{plan.epochs}  step {step + 1}/{n_steps}  loss "
                      f"{loss_now:.4f}  acc {acc_now:.1f}%  {rate:.1f} img/s  ~{left:.0f} s left "
                      f"in this epoch")
                due = now + PROGRESS_EVERY_S
    bar.close()
    return meter.result(env.device)
