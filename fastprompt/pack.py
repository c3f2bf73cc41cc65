"""Packed passes: several runs of one method over one frozen backbone, one backbone pass for all.

Each run computes its objective with its own, unchanged method code (`Method.loss_and_logits`),
in a thread of its own. The backbone's entry points (`Backbone.encode_image`, `encode_text`, ...,
marked `@gathered`) do not compute in such a thread: they hand the call to the pack and wait. When
every run is waiting (or done), the pack merges the calls of one kind into one call — the runs'
images (or class sequences) concatenated, each sample carrying its own run's prompts (per-sample
rows) and adapters (per-segment branches) — runs it once, and gives each run its slice. The runs
then go on to their next backbone call or their loss. So every run computes what it computes alone
(the same ops on the same values; only the batch a matmul sees is larger, which moves results by
rounding), and the frozen backbone runs once per call for all of them.

Calls that cannot be merged (different structure, a kind without a merge rule such as CoCoOp's
per-image text pass) run one after the other: slower, never different. Random numbers a call draws
(CLIP-LoRA's dropout masks) come from its run's own `RandomStream`, which continues where the
run's batches left it, as alone; merged or not, each run's masks are its solo run's. Grad mode and
autocast are per thread in torch: a run's thread inherits the caller's, and each call runs under
the grad mode its run had when it made it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from dataclasses import dataclass, field

import torch

from .backbone import SegmentedAdapter, TowerHooks
from .gather import _local
from .lora import LoRA, SegmentedLoRA

@dataclass
class Call:
    fn: object
    backbone: object
    args: tuple
    kwargs: dict
    grad: bool
    stream: object = contextlib.nullcontext()  # the run's RandomStream, or the generators as they are
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None


class Pack:
    """Runs `jobs` (callables, one per run) together: `Pack().run(jobs)` returns their results in
    order; an exception in any run is raised here after every run stopped."""

    def __init__(self, streams: list | None = None):
        """streams: each job's RandomStream, which its unmerged calls draw from (None: the
        generators as they are)."""
        self._streams = streams
        self._cond = threading.Condition()
        self._waiting: dict[int, Call] = {}
        self._live = 0

    # ------------------------------------------------------------------ run threads
    def submit(self, fn, backbone, args, kwargs):
        stream = self._streams[_local.index] if self._streams else contextlib.nullcontext()
        call = Call(fn, backbone, args, kwargs, torch.is_grad_enabled(), stream)
        with self._cond:
            self._waiting[_local.index] = call
            self._cond.notify_all()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def _worker(self, index, job, results, errors, state):
        _local.pack, _local.index = self, index
        try:
            with _same_state(state):
                results[index] = job()
        except BaseException as err:  # noqa: BLE001 - re-raised by run()
            errors[index] = err
        finally:
            _local.pack = None
            with self._cond:
                self._live -= 1
                self._cond.notify_all()

    # ------------------------------------------------------------------ the caller's thread
    def run(self, jobs: list):
        results, errors = [None] * len(jobs), [None] * len(jobs)
        state = _capture_state()
        self._live = len(jobs)
        threads = [threading.Thread(target=self._worker, args=(i, job, results, errors, state),
                                    daemon=True) for i, job in enumerate(jobs)]
        for t in threads:
            t.start()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: len(self._waiting) == self._live)
                if self._live == 0:
                    break
                calls, self._waiting = dict(sorted(self._waiting.items())), {}
            self._execute(list(calls.values()))
        for t in threads:
            t.join()
        for err in errors:
            if err is not None:
                raise err
        return results

    def _execute(self, calls: list[Call]) -> None:
        """Merge the calls that can be merged, run each group once, hand out the slices."""
        groups: dict = {}
        for call in calls:
            groups.setdefault(_signature(call), []).append(call)
        for key, group in groups.items():
            merge = MERGES.get(group[0].fn.__name__) if key is not None else None
            try:
                with torch.set_grad_enabled(group[0].grad):
                    if merge is not None and len(group) > 1:
                        merge(group)
                    else:
                        for call in group:
                            with call.stream:
                                call.result = call.fn(call.backbone, *call.args, **call.kwargs)
            except BaseException as err:  # noqa: BLE001 - each run re-raises it in its thread
                for call in group:
                    call.error = err
            for call in group:
                call.done.set()


class RandomStream:
    """One run's random numbers while torch's global generators (CPU, and the CUDA one of
    `device`) serve several runs: `with stream:` puts the run's state in and, on leaving, keeps
    where the run got to and puts the outer state back."""

    def __init__(self, device: torch.device):
        self.device, self.state, self._outer = device, None, []

    def _get(self):
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _set(self, state) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    def __enter__(self):
        self._outer.append(self._get())
        if self.state is not None:  # None: the run starts from the generators as they are
            self._set(self.state)
        return self

    def __exit__(self, *exc):
        self.state = self._get()
        self._set(self._outer.pop())


# ---------------------------------------------------------------------- thread state
def _capture_state():
    kinds = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    return {"grad": torch.is_grad_enabled(),
            "autocast": {k: (torch.is_autocast_enabled(k), torch.get_autocast_dtype(k)) for k in kinds}}


class _same_state:
    """Grad mode and autocast of the caller, in a run thread (both are thread-local in torch)."""

    def __init__(self, state):
        self.state, self.stack = state, []

    def __enter__(self):
        self.stack.append(torch.set_grad_enabled(self.state["grad"]))
        self.stack[-1].__enter__()
        for kind, (on, dtype) in self.state["autocast"].items():
            ctx = torch.autocast(kind, dtype=dtype, enabled=on)
            ctx.__enter__()
            self.stack.append(ctx)

    def __exit__(self, *exc):
        while self.stack:
            self.stack.pop().__exit__(*exc)


# ---------------------------------------------------------------------- merging
def _hooks_of(call):
    """The TowerHooks argument of a call (positional or keyword), or None."""
    for value in (*call.args, *call.kwargs.values()):
        if isinstance(value, TowerHooks):
            return value
    return None


def _signature(call):
    """Calls with equal signatures merge; None: this call runs by itself."""
    hooks = _hooks_of(call)
    name = call.fn.__name__
    if name not in MERGES:
        return None
    if hooks is not None:
        extra = [f.name for f in dataclasses.fields(TowerHooks)
                 if f.name not in MERGEABLE_HOOKS and getattr(hooks, f.name)]
        if extra:
            return None
        if not all(isinstance(s, LoRA) for s in hooks.lora.values()):
            return None  # merged weights (inference): nothing a pack trains
        shape = (tuple((k, tuple(p.shape[-2:]), p.dtype) for k, p in sorted(hooks.prompts.items())),
                 tuple(sorted(hooks.adapters)),
                 tuple((k, tuple(sorted(s.A)), s.dropout, tuple(s.A[next(iter(s.A))].shape))
                       for k, s in sorted(hooks.lora.items())))
    else:
        shape = ()
    first = call.args[0]
    others = tuple(v for v in call.args[1:] if not isinstance(v, (torch.Tensor, TowerHooks)))
    kw = tuple(sorted((k, v) for k, v in call.kwargs.items()
                      if not isinstance(v, (torch.Tensor, TowerHooks)) and k != "used"))
    return (name, call.grad, tuple(first.shape[1:]), first.dtype, str(first.device), shape,
            repr(others), repr(kw))


#: TowerHooks fields the merge knows how to give per-sample rows
MERGEABLE_HOOKS = ("prompts", "adapters", "lora")


def merge_hooks(hooks: list, sizes: list[int], streams: list):
    """One TowerHooks for the concatenated rows: each layer's prompts per sample (a run's shared
    [n, D] rows repeated for its samples, per-sample [N_r, n, D] rows kept), each layer's adapter
    a `SegmentedAdapter` applying run r's branch to run r's rows, each block's LoRA a
    `SegmentedLoRA` adding run r's low-rank terms to run r's rows (its dropout masks drawn from
    run r's stream)."""
    prompts = {}
    for layer in hooks[0].prompts:
        rows = [p if p.dim() == 3 else p.unsqueeze(0).expand(n, -1, -1)
                for p, n in zip((h.prompts[layer] for h in hooks), sizes)]
        prompts[layer] = torch.cat(rows)
    adapters = {layer: SegmentedAdapter([h.adapters[layer] for h in hooks], list(sizes))
                for layer in hooks[0].adapters}
    lora = {block: SegmentedLoRA([h.lora[block] for h in hooks], list(sizes), list(streams))
            for block in hooks[0].lora}
    return TowerHooks(prompts=prompts, adapters=adapters, lora=lora)


def _merge_rows(group: list[Call], rows: tuple[int, ...], used: bool):
    """Run group[0].fn once on the calls' arguments at positions `rows` concatenated (the first of
    them gives each call's row count), their hooks merged, `used` as the largest; split the result."""
    sizes = [c.args[rows[0]].shape[0] for c in group]
    args, kwargs = list(group[0].args), dict(group[0].kwargs)
    for i in rows:
        args[i] = torch.cat([c.args[i] for c in group])
    hooks = [_hooks_of(c) for c in group]
    if hooks[0] is not None:  # the signature made sure every call has hooks of one structure
        merged = merge_hooks(hooks, sizes, [c.stream for c in group])
        at = [i for i, a in enumerate(args) if a is hooks[0]]
        if at:
            args[at[0]] = merged
        else:
            kwargs.update({k: merged for k, v in kwargs.items() if v is hooks[0]})
    if used:
        values = [c.kwargs.get("used") for c in group]
        kwargs["used"] = None if None in values else max(values)
    out = group[0].fn(group[0].backbone, *args, **kwargs)
    for call, part in zip(group, torch.split(out, sizes)):
        call.result = part


def _merge_image(group):      # encode_image(images, hooks, opts)
    _merge_rows(group, (0,), used=False)


def _merge_text(group):       # encode_text(emb, eot, hooks, opts, prompt_start, used)
    _merge_rows(group, (0, 1), used=True)


def _merge_text_from(group):  # encode_text_from(x, eot, layer, hooks, opts, prompt_start)
    _merge_rows(group, (0, 1), used=False)


#: Backbone entry point -> how a group of its calls runs as one
MERGES = {"encode_image": _merge_image, "encode_text": _merge_text,
          "encode_text_from": _merge_text_from}
