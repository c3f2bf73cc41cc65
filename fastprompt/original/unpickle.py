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

Time, memory and sizes are bounded before anything is built (a hostile 1 kB file must fail fast):

* each pickle is scanned first (`pickletools.genops`, nothing executed): at most `MAX_PICKLE_BYTES`,
  `MAX_OPCODES` opcodes and memo indices below `MAX_MEMO` (the C unpickler sizes its memo by the
  largest index it is given); every object then comes from at most one opcode, so containers and
  the memo stay bounded too. Nothing from the file is ever formatted with a full `repr`;
* zip archives: member count, every member's declared size against the archive's size, stored
  (uncompressed, as torch writes) members' declared vs. actual size, a compression-ratio cap for
  compressed members (zip bombs), and each storage's byte size against the element count its
  persistent id declares;
* legacy files: the storages' declared sizes must fit in the file before anything is allocated;
* tensors: sizes and strides must be non-negative integers, the view must lie inside its storage
  and hold no more elements than the storage (no stride-0 expansion to terabytes).
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError, short_repr

_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
MAX_PICKLE_BYTES = 64 << 20   # the object structure of a checkpoint is kilobytes
MAX_OPCODES = 2_000_000
MAX_MEMO = 1_000_000
MAX_MEMBERS = 100_000
MAX_RATIO = 20                # compressed zip members (torch stores them uncompressed)
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


class _Storage:
    """Raw bytes of one storage plus the element type the file gives it."""

    def __init__(self, flat: torch.Tensor, dtype: torch.dtype):
        self.flat, self.dtype = flat, dtype  # flat: 1-D tensor of `dtype`


def _ints(value, what: str) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise UnpickleError(f"tensor {what} {short_repr(value)} is not a list of non-negative integers")
    return tuple(value)


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    if not isinstance(storage, _Storage):
        return placeholder_class("torch", "tensor-without-storage")()
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    (offset,) = _ints((offset,), "offset")
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
            raise UnpickleError(f"unsupported persistent id {short_repr(pid)} in the checkpoint")
        return self._load_storage(pid)


def _dtype(storage_type) -> torch.dtype:
    if isinstance(storage_type, tuple) and storage_type[:1] == ("storage-type",):
        return _DTYPES[storage_type[1]]
    if isinstance(storage_type, torch.dtype):  # newer files may name the dtype directly
        return storage_type
    raise UnpickleError(f"unknown storage type {short_repr(storage_type)} in the checkpoint")


def _flat(raw: bytes, dtype: torch.dtype) -> torch.Tensor:
    if not raw:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype)


def _member(zf: zipfile.ZipFile, name: str, path: Path, size: int):
    """ZipInfo of `name`, its declared size checked against the archive and the compression cap."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise UnpickleError(f"{path} lacks record {name}: truncated file?") from None
    if info.header_offset + info.compress_size > size:
        raise UnpickleError(f"{path}: record {name} claims {info.compress_size} bytes beyond the "
                            f"end of the file: truncated or corrupt")
    if info.compress_type == zipfile.ZIP_STORED:
        if info.file_size != info.compress_size:
            raise UnpickleError(f"{path}: stored record {name} declares {info.file_size} bytes but "
                                f"holds {info.compress_size}: corrupt file")
    elif info.file_size > MAX_RATIO * max(info.compress_size, 1) + 4096:
        raise UnpickleError(f"{path}: record {name} expands {info.compress_size} bytes to "
                            f"{info.file_size} (over {MAX_RATIO}x): refused as a zip bomb")
    return info


def _read(zf: zipfile.ZipFile, info, path: Path) -> bytes:
    with zf.open(info) as f:
        data = f.read(info.file_size + 1)
    if len(data) != info.file_size:
        raise UnpickleError(f"{path}: record {info.filename} holds {len(data)} bytes, its header "
                            f"says {info.file_size}: corrupt file")
    return data


def _load_zip(path: Path):
    size = os.path.getsize(path)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        if len(names) > MAX_MEMBERS:
            raise UnpickleError(f"{path} has {len(names)} records: not a torch checkpoint")
        pkl = [n for n in names if n.endswith("data.pkl")]
        if not pkl:
            raise UnpickleError(f"{path} is a zip file but not a torch checkpoint (no data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names:
            order = _read(zf, _member(zf, f"{prefix}byteorder", path, size), path)
            if order.strip() != b"little":
                raise UnpickleError(f"{path} was written on a big-endian machine: not supported")
        cache: dict = {}

        def load_storage(pid):
            if len(pid) < 5:
                raise UnpickleError(f"{path}: malformed storage record {short_repr(pid)}")
            _, storage_type, key, _location, numel, *_ = pid
            dtype = _dtype(storage_type)
            if key not in cache:
                info = _member(zf, f"{prefix}data/{key}", path, size)
                item = torch.empty((), dtype=dtype).element_size()
                if not isinstance(numel, int) or info.file_size != numel * item:
                    raise UnpickleError(f"{path}: storage {short_repr(key)} declares {short_repr(numel)} "
                                        f"{dtype} elements but its record holds {info.file_size} bytes")
                cache[key] = _Storage(_flat(_read(zf, info, path), torch.uint8), dtype)
            byte = cache[key].flat
            return _Storage(byte.view(dtype) if byte.numel() else torch.empty(0, dtype=dtype), dtype)

        info = _member(zf, pkl[0], path, size)
        if info.file_size > MAX_PICKLE_BYTES:
            raise UnpickleError(f"{path}: data.pkl declares {info.file_size} bytes, over the "
                                f"{MAX_PICKLE_BYTES} a checkpoint's structure needs")
        data = _read(zf, info, path)
        scan_pickle(data, path)
        return _Unpickler(io.BytesIO(data), load_storage).load()


def _load_legacy(path: Path):
    """Pre-1.6 format: magic, protocol, sys info, the object, storage keys, then raw storages."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        roots: dict = {}
        declared = [0]  # bytes of every storage so far: they must fit in the file

        def load_storage(pid):
            if len(pid) < 5:
                raise UnpickleError(f"{path}: malformed storage record {short_repr(pid)}")
            _, storage_type, key, _location, numel, view = (*pid, None)[:6]
            dtype = _dtype(storage_type)
            if key not in roots:
                item = torch.empty((), dtype=dtype).element_size()
                if not isinstance(numel, int) or numel < 0 or declared[0] + numel * item > size:
                    raise UnpickleError(f"{path}: storage {short_repr(key)} declares "
                                        f"{short_repr(numel)} elements, more than the file holds")
                declared[0] += numel * item
                roots[key] = _Storage(torch.empty(numel, dtype=dtype), dtype)
            root = roots[key]
            if view is not None:  # (view_key, offset, size): a slice of the root storage
                if not isinstance(view, tuple) or len(view) != 3:
                    raise UnpickleError(f"{path}: malformed storage view {short_repr(view)}")
                off, n = _ints(view[1:], "view")
                if off + n > root.flat.numel():
                    raise UnpickleError(f"{path}: storage view {short_repr(view)} lies outside its storage")
                return _Storage(root.flat[off:off + n], dtype)
            return root

        def read(with_storage=False):
            start = f.tell()
            data = f.read(MAX_PICKLE_BYTES + 1)
            scan_pickle(data[:MAX_PICKLE_BYTES] if len(data) > MAX_PICKLE_BYTES else data, path)
            f.seek(start)
            return _Unpickler(f, load_storage if with_storage else _no_storage).load()

        if read() != _LEGACY_MAGIC:
            raise UnpickleError(f"{path} is neither a zip nor a legacy torch checkpoint")
        read()  # protocol version
        read()  # sys info
        obj = read(with_storage=True)
        keys = read()
        for key in keys:
            if key not in roots:
                raise UnpickleError(f"{path}: storage {short_repr(key)} listed but never used")
            flat = roots[key].flat
            (numel,) = struct.unpack("<q", f.read(8))
            raw = f.read(numel * flat.element_size())
            if numel != flat.numel() or len(raw) != numel * flat.element_size():
                raise UnpickleError(f"{path}: storage {short_repr(key)} is truncated")
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
            zipfile.BadZipFile, RuntimeError, AttributeError, IndexError, RecursionError,
            OverflowError, MemoryError, zipfile.LargeZipFile, NotImplementedError) as e:
        text = str(e)[:200].splitlines()
        raise UnpickleError(f"cannot read {path} as a torch checkpoint: {type(e).__name__}: "
                            f"{text[0] if text else ''}") from None
