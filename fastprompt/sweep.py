"""Packed training: up to `size` runs of one method and backbone step together, one backbone pass
for all of them per step (`fastprompt.pack`). `fit_many(configs)` is `fastprompt.fit` for a list
of runs: it packs those of one method and backbone, shares their backbone, and gives each run the
directory, files and metrics `fit` gives it.

Each run keeps everything of its own (`training.Trainer`): data order and augmentation (its random
stream is swapped in around each of its batches, so it draws exactly what it draws alone), optimiser
and its state, learning-rate schedule, epoch count, checkpoints and log. Their losses are summed
before one backward pass; the runs share no parameter, so each run's gradient is its own. A run
whose last epoch ends leaves the pack (its `finish` writes its directory and frees its tensors) and
the next queued run takes its place; a run that fails (NaN loss, an unwritable checkpoint) leaves
with its error and the others go on.
"""
from __future__ import annotations

import contextlib
import resource
import sys
import time
from dataclasses import dataclass

import torch

from .pack import Pack, RandomStream
from .runtime import autocast
from .training import PROGRESS_EVERY_S, SYNC_EVERY, EpochMeter, Trainer


def fit_many(configs: list, pack: int = 8, log=None, warn=None, progress=None, on_done=None) -> list:
    """Train and evaluate every run of `configs` (TrainConfig), up to `pack` runs of one method
    and backbone at a time in one packed pass (`train_packed`); returns each run's metrics, or
    the exception that stopped it, in order. A run already finished in its directory is reported,
    not trained again (`jobs.finished_metrics`); `pack=1`, or torchrun's several processes (DDP
    splits each run's batches instead), trains them one after the other. `on_done(i, result)` is
    called as each run ends (a table writes its cell then)."""
    from .jobs import fit
    from .runtime import distributed_world

    log = log or (lambda line: None)
    done = on_done or (lambda i, result: None)
    if pack <= 1 or distributed_world() > 1:
        out = []
        for i, config in enumerate(configs):
            try:
                out.append(fit(config, log, warn, progress))
            except Exception as err:  # noqa: BLE001 - one run's failure; the others go on
                out.append(err)
            done(i, out[-1])
        return out
    results: list = [None] * len(configs)
    groups: dict = {}
    for i, config in enumerate(configs):
        groups.setdefault(pack_key(config), []).append(i)
    for indices in groups.values():
        backbone: dict = {}
        starts = [lambda c=configs[i]: _enter(c, backbone, log, warn, progress) for i in indices]
        for i, result in zip(indices, train_packed(starts, pack, log, progress,
                                                   lambda j, r, ix=indices: done(ix[j], r))):
            results[i] = result
    return results


def pack_key(config) -> tuple:
    """Runs with equal keys share a pack: one method, one backbone (weights and activation), one
    device and precision, one code path (--plain)."""
    return (config.method, config.model, config.weights, config.backbone_seed, config.quick_gelu,
            config.device, config.precision, config.plain)


class Entry:
    """A run entering a pack: its trainer in its held run directory; `finish(stats)` evaluates it
    and releases the directory, `abort(err)` releases it as a failed `fit` would."""

    def __init__(self, run, stack, work, trainer):
        self.run, self.stack, self.work, self.trainer = run, stack, work, trainer

    def finish(self, stats):
        from .jobs import finish

        try:
            metrics = finish(self.run, self.work, stats)
        except BaseException as err:
            self.abort(err)
            raise
        self.stack.close()
        return metrics

    def abort(self, err: BaseException) -> None:
        self.stack.__exit__(type(err), err, err.__traceback__)


def _enter(config, backbone: dict, log, warn, progress):
    """`fit` up to its first step, for a pack: the backbone loaded once for the pack's runs."""
    from .jobs import finished_metrics, prepare, start
    from .rundir import open_run_dir

    name = f"{config.dataset_name} seed {config.seed}"

    def said(say):  # each run's lines in a pack carry its name
        return None if say is None else (lambda line: say(f"[{name}] {line}"))
    run = prepare(config, said(log), said(warn), progress, clip=backbone.get("clip"))
    backbone.setdefault("clip", run.inputs["clip"])
    done = finished_metrics(run)
    if done is not None:
        return done
    stack = contextlib.ExitStack()
    work = stack.enter_context(open_run_dir(run.out, run.config.resume, run.config.overwrite))
    try:
        return Entry(run, stack, work, start(run, work))
    except BaseException as err:
        stack.__exit__(type(err), err, err.__traceback__)
        raise


@dataclass
class Seat:
    """One run's place in a pack: its entry (trainer, finish, abort), its epoch in flight and its
    random stream."""

    index: int
    entry: object
    name: str = ""
    batches: object = None             # the epoch's batch iterator (None between epochs)
    meter: EpochMeter | None = None
    step: int = 0
    stream: RandomStream | None = None  # set by __post_init__

    def __post_init__(self):
        self.stream = RandomStream(self.trainer.env.device)

    @property
    def trainer(self) -> Trainer:
        return self.entry.trainer

    def next_batch(self):
        """The run's next batch, drawn from the run's own random stream (as alone)."""
        t = self.trainer
        with self.stream:
            if self.batches is None:  # a new epoch: the stream reseeded by (seed, epoch) as alone
                self.batches = iter(t.loader())
                self.meter, self.step = EpochMeter(t.env.device), 0
            images, labels = next(self.batches)
        return images.to(t.env.device, non_blocking=True), labels.to(t.env.device, non_blocking=True)


def train_packed(runs: list, size: int, log=print, progress=None, on_done=None) -> list:
    """Train `runs` (callables, each called when its run enters the pack — its setup is made then,
    not before — and returning an object with `.trainer`, `.finish(stats)` and `.abort(err)`, or
    a finished result) `size` at a time; returns each run's `finish(stats)` result, or the
    exception that stopped that run, in order (`on_done(i, result)` as each one ends). One
    process, no DDP."""
    results = _Results(len(runs), on_done)
    queue, seats = list(enumerate(runs)), []
    scaler, peak, due, env = None, 0, time.perf_counter() + PROGRESS_EVERY_S, None
    try:
        while queue or seats:
            while queue and len(seats) < size:
                index, start = queue.pop(0)
                try:
                    entry = start()
                except Exception as err:  # noqa: BLE001 - the run's own failure; the others go on
                    results[index] = err
                    continue
                if not hasattr(entry, "trainer"):  # finished before: nothing to train
                    results[index] = entry
                elif entry.trainer.done:
                    results[index] = entry.finish(entry.trainer.finish())
                else:
                    seats.append(Seat(index, entry, getattr(entry.trainer.run_dir, "name", "")))
            if not seats:
                break
            env = seats[0].trainer.env
            if scaler is None:
                scaler = torch.amp.GradScaler(env.device.type, enabled=env.precision == "fp16")
            _packed_step(seats, scaler, env)
            peak = max(peak, _memory(env.device))
            for seat in list(seats):
                try:
                    done = _advance(seat)
                    if done:
                        results[seat.index] = seat.entry.finish(seat.trainer.finish())
                except Exception as err:  # noqa: BLE001 - this run stops (its last epoch is saved)
                    results[seat.index] = err
                    seat.entry.abort(err)
                    done = True
                if done:
                    seats.remove(seat)  # its model, optimiser and batches go with it
            if progress is not None and time.perf_counter() >= due and seats:
                progress("pack: " + ", ".join(f"{s.name or s.index} epoch {s.trainer.epoch + 1}/"
                                              f"{s.trainer.plan.epochs} step {s.step}" for s in seats))
                due = time.perf_counter() + PROGRESS_EVERY_S
    except BaseException as err:  # Ctrl-C: every run in the pack keeps its last finished epoch
        for seat in seats:
            seat.entry.abort(err)
        raise
    if env is not None:
        where = "GPU memory allocated" if env.device.type == "cuda" else "process resident memory"
        log(f"pack of up to {size} runs: peak {where} {peak / 2**20:.0f} MiB")
    return list(results)


class _Results(list):
    """The runs' results, in order; `on_done(i, result)` told of each as it is set."""

    def __init__(self, n: int, on_done=None):
        super().__init__([None] * n)
        self.on_done = on_done

    def __setitem__(self, i, result):
        super().__setitem__(i, result)
        if self.on_done is not None:
            self.on_done(i, result)


def _packed_step(seats: list, scaler, env) -> None:
    """One optimiser step of every seated run: their batches, one packed forward, one backward."""
    batches = [seat.next_batch() for seat in seats]
    for seat in seats:
        seat.meter.lrs.append(seat.trainer.set_lr(seat.step))
        seat.trainer.optimizer.zero_grad(set_to_none=True)
    with autocast(env.device, env.precision):
        if len(seats) == 1:  # nothing to merge: no threads (a pack's last run often trains alone)
            with seats[0].stream:
                outs = [seats[0].trainer.model.loss_and_logits(*batches[0])]
        else:
            outs = Pack([s.stream for s in seats]).run(
                [lambda s=s, b=b: s.trainer.model.loss_and_logits(*b) for s, b in zip(seats, batches)])
    scaler.scale(sum(loss for loss, _ in outs)).backward()
    for seat, (loss, logits), (_, labels) in zip(seats, outs, batches):
        scaler.step(seat.trainer.optimizer)
        seat.meter.add(loss, logits.detach(), labels)
    scaler.update()


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
