"""Packed training: up to `size` runs of one method and backbone step together, one backbone pass
for all of them per step (`fastprompt.pack`).

Each run keeps everything of its own (`training.Trainer`): data order and augmentation (its random
stream is swapped in around each of its batches, so it draws exactly what it draws alone), optimiser
and its state, learning-rate schedule, epoch count, checkpoints and log. Their losses are summed
before one backward pass; the runs share no parameter, so each run's gradient is its own. A run
whose last epoch ends leaves the pack (its `finish` writes its directory and frees its tensors) and
the next queued run takes its place; a run that fails (NaN loss, an unwritable checkpoint) leaves
with its error and the others go on.
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field

import torch

from .pack import Pack
from .runtime import autocast
from .training import PROGRESS_EVERY_S, SYNC_EVERY, EpochMeter, Trainer


@dataclass
class Seat:
    """One run's place in a pack: its trainer, its epoch in flight and its random stream."""

    index: int
    trainer: Trainer
    finish: object                     # callable(stats) -> the run's result, when it leaves
    name: str = ""
    batches: object = None             # the epoch's batch iterator (None between epochs)
    meter: EpochMeter | None = None
    step: int = 0
    rng: torch.Tensor = field(default=None)

    def next_batch(self):
        """The run's next batch, drawn under the run's own random stream (as alone)."""
        t = self.trainer
        outer = torch.get_rng_state()
        try:
            if self.batches is None:  # a new epoch: seeded by (seed, epoch) as alone
                self.batches = iter(t.loader())
                self.meter, self.step = EpochMeter(t.env.device), 0
            else:
                torch.set_rng_state(self.rng)
            images, labels = next(self.batches)
            self.rng = torch.get_rng_state()
        finally:
            torch.set_rng_state(outer)
        return images.to(t.env.device, non_blocking=True), labels.to(t.env.device, non_blocking=True)


def train_packed(runs: list, size: int, log=print, progress=None) -> list:
    """Train `runs` (callables, each returning `(trainer, finish)` when the run enters the pack:
    its setup is made then, not before) `size` at a time; returns each run's `finish(stats)` result
    in order, or the exception that stopped that run. One process, no DDP."""
    results: list = [None] * len(runs)
    queue, seats = list(enumerate(runs)), []
    scaler, peak, due = None, 0, time.perf_counter() + PROGRESS_EVERY_S
    while queue or seats:
        while queue and len(seats) < size:
            index, start = queue.pop(0)
            try:
                trainer, finish = start()
            except Exception as err:  # noqa: BLE001 - the run's own failure; the others go on
                results[index] = err
                continue
            if trainer.done:
                results[index] = finish(trainer.finish())
                continue
            seats.append(Seat(index, trainer, finish, getattr(trainer.run_dir, "name", "")))
        if not seats:
            break
        env = seats[0].trainer.env
        if scaler is None:
            scaler = torch.amp.GradScaler(env.device.type, enabled=env.precision == "fp16")
        batches = [seat.next_batch() for seat in seats]
        for seat in seats:
            seat.meter.lrs.append(seat.trainer.set_lr(seat.step))
            seat.trainer.optimizer.zero_grad(set_to_none=True)
        with autocast(env.device, env.precision):
            outs = Pack().run([lambda s=s, b=b: s.trainer.model.loss_and_logits(*b)
                               for s, b in zip(seats, batches)])
        scaler.scale(sum(loss for loss, _ in outs)).backward()
        for seat, (loss, logits), (_, labels) in zip(seats, outs, batches):
            scaler.step(seat.trainer.optimizer)
            seat.meter.add(loss, logits.detach(), labels)
        scaler.update()
        peak = max(peak, _memory(env.device))
        for seat in list(seats):
            try:
                left = _advance(seat)
            except Exception as err:  # noqa: BLE001 - this run stops (its last epoch is saved)
                results[seat.index] = err
                seats.remove(seat)
                continue
            if left:
                results[seat.index] = seat.finish(seat.trainer.finish())
                seats.remove(seat)  # its model, optimiser and batches go with it
        if progress is not None and time.perf_counter() >= due and seats:
            progress("pack: " + ", ".join(f"{s.name or s.index} epoch {s.trainer.epoch + 1}/"
                                          f"{s.trainer.plan.epochs} step {s.step}" for s in seats))
            due = time.perf_counter() + PROGRESS_EVERY_S
    log(f"pack of up to {size} runs: peak memory {peak / 2**20:.0f} MiB "
        f"({'GPU allocated' if str(getattr(env, 'device', 'cpu')).startswith('cuda') else 'process RSS'})"
        if runs else "pack: no runs")
    return results


def _advance(seat: Seat) -> bool:
    """Count the step; at the epoch's end check it, log and checkpoint it. True when the run is done."""
    t = seat.trainer
    seat.step += 1
    last = seat.step == t.plan.steps(t.epoch)
    if last or seat.step - seat.meter.checked >= SYNC_EVERY:
        seat.meter.check(t.epoch, seat.step, t.run_dir)
    if not last:
        return False
    t.end_epoch(seat.meter.result(t.env.device))
    seat.batches, seat.meter = None, None
    return t.done


def _memory(device) -> int:
    """Bytes: peak CUDA memory allocated, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
