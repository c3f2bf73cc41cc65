"""What a pickle inside a checkpoint may build: the restricted unpickler of `unpickle.py`.

`torch.save` files of the original trainers pickle whole objects (Dassl's warm-up scheduler holds
its successor), so `torch.load(weights_only=True)` refuses them and `torch.load` without it would
run whatever the file names. `Unpickler` runs nothing from the file:

* `find_class` resolves only tensor-rebuild functions (our own, below), `collections.OrderedDict`
  and `set`/`frozenset`; every other global becomes an inert `Placeholder` subclass that records
  its name and swallows whatever arguments or state the pickle feeds it;
* storages come from the caller (`persistent_load`), as raw bytes viewed as tensors;
* before any of it runs, `scan_pickle` reads the opcodes (`pickletools.genops`, nothing executed):
  at most `MAX_PICKLE_BYTES`, `MAX_OPCODES` opcodes and memo indices below `MAX_MEMO` (the C
  unpickler sizes its memo by the largest index it is given); every object then comes from at
  most one opcode, so containers and the memo stay bounded too. Nothing from the file is ever
  formatted with a full `repr`;
* tensors: sizes and strides must be non-negative integers, the view must lie inside its storage
  and hold no more elements than the storage (no stride-0 expansion to terabytes).
"""
from __future__ import annotations

import collections
import io
import pickle
import pickletools

import torch

from ..errors import CheckpointError, short_repr

_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}
MAX_PICKLE_BYTES = 64 << 20   # the object structure of a checkpoint is kilobytes
MAX_OPCODES = 2_000_000
MAX_MEMO = 1_000_000
MAX_DIMS = 64
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}


class UnpickleError(CheckpointError):
    """A file this reader cannot read (one-line reason)."""


def scan_pickle(data: bytes, where) -> None:
    """Refuse a pickle over the size, opcode or memo bounds (see the module docstring), without
    executing any of it."""
    if len(data) > MAX_PICKLE_BYTES:
        raise UnpickleError(f"{where}: the pickle holds {len(data)} bytes, over the "
                            f"{MAX_PICKLE_BYTES} a checkpoint's structure needs")
    try:
        for n, (op, arg, _pos) in enumerate(pickletools.genops(io.BytesIO(data))):
            if n >= MAX_OPCODES:
                raise UnpickleError(f"{where}: the pickle has over {MAX_OPCODES} opcodes: not a "
                                    f"checkpoint's structure")
            if op.name in _PUTS and (not isinstance(arg, int) or not 0 <= arg < MAX_MEMO):
                raise UnpickleError(f"{where}: the pickle asks for memo slot {short_repr(arg)} "
                                    f"(at most {MAX_MEMO}): refused")
    except UnpickleError:
        raise
    except Exception as err:  # noqa: BLE001 - genops raises ValueError and others on bad data
        raise UnpickleError(f"{where}: not a valid pickle ({type(err).__name__}: "
                            f"{short_repr(str(err), 80)})") from None


class Placeholder:
    """Stands for any object the file names but we do not rebuild; it never runs file code."""

    origin = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.state, self.items = args, None, []

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items.append((key, value))

    def append(self, value):
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def __repr__(self) -> str:
        return f"<placeholder for {self.origin}>"


_placeholders: dict[str, type] = {}


def placeholder_class(module: str, name: str) -> type:
    origin = f"{module}.{name}"
    if origin not in _placeholders:
        _placeholders[origin] = type("Placeholder", (Placeholder,), {"origin": origin})
    return _placeholders[origin]


class Storage:
    """Raw bytes of one storage plus the element type the file gives it."""

    def __init__(self, flat: torch.Tensor, dtype: torch.dtype):
        self.flat, self.dtype = flat, dtype  # flat: 1-D tensor of `dtype`


def nonneg_ints(value, what: str) -> tuple:
    """`value` as a tuple of at most MAX_DIMS non-negative ints, else UnpickleError."""
    if not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise UnpickleError(f"tensor {what} {short_repr(value)} is not a list of non-negative integers")
    return tuple(value)


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    if not isinstance(storage, Storage):
        return placeholder_class("torch", "tensor-without-storage")()
    size, stride = nonneg_ints(size, "size"), nonneg_ints(stride, "stride")
    (offset,) = nonneg_ints((offset,), "offset")
    if len(size) != len(stride):
        raise UnpickleError(f"tensor size {size} and stride {stride} differ in length")
    numel, have = 1, storage.flat.numel()
    for n in size:
        numel *= n
    if numel:
        last = offset + sum((n - 1) * st for n, st in zip(size, stride))
        if last >= have or numel > have:
            raise UnpickleError(f"a tensor of size {size} (stride {stride}, offset {offset}) "
                                f"declares more than its storage of {have} elements holds")
    return torch.as_strided(storage.flat, size, stride, offset)


def _rebuild_parameter(data, *_ignored):
    return data


def _rebuild_from_type(func, _new_type, args, _state=None):
    return func(*args) if func in (_rebuild_tensor, _rebuild_parameter) else placeholder_class(
        "torch", "tensor-subclass")()


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor"): lambda storage, offset, size, stride: _rebuild_tensor(
        storage, offset, size, stride),
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
}


class Unpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED` (placeholders for the rest); `load_storage(pid)` supplies each
    storage a persistent id names."""

    def __init__(self, file, load_storage):
        super().__init__(file, encoding="latin1")
        self._load_storage = load_storage

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _DTYPES:
            return ("storage-type", name)  # only ever used as data in persistent ids
        return placeholder_class(module, name)

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise UnpickleError(f"unsupported persistent id {short_repr(pid)} in the checkpoint")
        return self._load_storage(pid)


def storage_dtype(storage_type) -> torch.dtype:
    """The element type a storage record names (as `find_class` left it, or a torch.dtype)."""
    if isinstance(storage_type, tuple) and storage_type[:1] == ("storage-type",):
        return _DTYPES[storage_type[1]]
    if isinstance(storage_type, torch.dtype):  # newer files may name the dtype directly
        return storage_type
    raise UnpickleError(f"unknown storage type {short_repr(storage_type)} in the checkpoint")


def flat_tensor(raw: bytes, dtype: torch.dtype) -> torch.Tensor:
    """Raw bytes as a 1-D tensor of `dtype` (a copy: the file's buffer is not kept)."""
    if not raw:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype)
