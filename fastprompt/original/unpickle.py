"""A restricted reader for `torch.save` files written by other code (the authors' trainers).

The original trainers save `{"state_dict", "epoch", "optimizer", "scheduler", "val_result"}` with
`torch.save`; the scheduler entry pickles whole objects (Dassl's warm-up scheduler holds its
successor), so `torch.load(weights_only=True)` refuses such files, and `torch.load` without it
would run whatever the file names. This reader runs nothing from the file:

* `find_class` resolves only tensor-rebuild functions (our own, below), `collections.OrderedDict`
  and `set`/`frozenset`; every other global becomes an inert `Placeholder` subclass that records
  its name and swallows whatever arguments or state the pickle feeds it.
* storages are read as raw bytes, from the zip archive (torch >= 1.6 default) or from the tail of
  a legacy (pre-1.6) file, and viewed as tensors with `torch.frombuffer` / `as_strided`.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import torch

_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class UnpickleError(ValueError):
    """A file this reader cannot read (one-line reason)."""


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


class _Storage:
    """Raw bytes of one storage plus the element type the file gives it."""

    def __init__(self, flat: torch.Tensor, dtype: torch.dtype):
        self.flat, self.dtype = flat, dtype  # flat: 1-D tensor of `dtype`


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    if not isinstance(storage, _Storage):
        return placeholder_class("torch", "tensor-without-storage")()
    return torch.as_strided(storage.flat, tuple(size), tuple(stride), int(offset))


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


class _Unpickler(pickle.Unpickler):
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
            raise UnpickleError(f"unsupported persistent id {pid!r:.60} in the checkpoint")
        return self._load_storage(pid)


def _dtype(storage_type) -> torch.dtype:
    if isinstance(storage_type, tuple) and storage_type[:1] == ("storage-type",):
        return _DTYPES[storage_type[1]]
    if isinstance(storage_type, torch.dtype):  # newer files may name the dtype directly
        return storage_type
    raise UnpickleError(f"unknown storage type {storage_type!r:.60} in the checkpoint")


def _flat(raw: bytes, dtype: torch.dtype) -> torch.Tensor:
    if not raw:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype)


def _load_zip(path: Path):
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl")]
        if not pkl:
            raise UnpickleError(f"{path} is a zip file but not a torch checkpoint (no data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder").strip() != b"little":
            raise UnpickleError(f"{path} was written on a big-endian machine: not supported")
        cache: dict = {}

        def load_storage(pid):
            _, storage_type, key, _location, *_ = pid
            dtype = _dtype(storage_type)
            if key not in cache:
                try:
                    raw = zf.read(f"{prefix}data/{key}")
                except KeyError:
                    raise UnpickleError(f"{path} lacks storage record data/{key}: truncated file?") from None
                cache[key] = _Storage(_flat(raw, torch.uint8), dtype)
            byte = cache[key].flat
            return _Storage(byte.view(dtype) if byte.numel() else torch.empty(0, dtype=dtype), dtype)

        return _Unpickler(io.BytesIO(zf.read(pkl[0])), load_storage).load()


def _load_legacy(path: Path):
    """Pre-1.6 format: magic, protocol, sys info, the object, storage keys, then raw storages."""
    with open(path, "rb") as f:
        roots: dict = {}

        def load_storage(pid):
            _, storage_type, key, _location, numel, view = (*pid, None)[:6]
            dtype = _dtype(storage_type)
            if key not in roots:
                roots[key] = _Storage(torch.empty(int(numel), dtype=dtype), dtype)
            root = roots[key]
            if view is not None:  # (view_key, offset, size): a slice of the root storage
                _vkey, off, size = view
                return _Storage(root.flat[int(off):int(off) + int(size)], dtype)
            return root

        def read(with_storage=False):
            return _Unpickler(f, load_storage if with_storage else _no_storage).load()

        if read() != _LEGACY_MAGIC:
            raise UnpickleError(f"{path} is neither a zip nor a legacy torch checkpoint")
        read()  # protocol version
        read()  # sys info
        obj = read(with_storage=True)
        keys = read()
        for key in keys:
            if key not in roots:
                raise UnpickleError(f"{path}: storage {key!r} listed but never used")
            flat = roots[key].flat
            (numel,) = struct.unpack("<q", f.read(8))
            raw = f.read(numel * flat.element_size())
            if numel != flat.numel() or len(raw) != numel * flat.element_size():
                raise UnpickleError(f"{path}: storage {key!r} is truncated")
            flat.copy_(_flat(raw, flat.dtype))
        return obj


def _no_storage(pid):
    raise UnpickleError("unexpected storage outside the main object of a legacy checkpoint")


def safe_load(path) -> object:
    """Read a `torch.save` file without executing anything from it (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise UnpickleError(f"checkpoint file not found: {path}")
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        return _load_legacy(path)
    except UnpickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, struct.error,
            zipfile.BadZipFile, RuntimeError, AttributeError, IndexError) as e:
        raise UnpickleError(f"cannot read {path} as a torch checkpoint: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
