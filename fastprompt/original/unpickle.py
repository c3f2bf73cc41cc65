"""A restricted reader for `torch.save` files written by other code (the authors' trainers).

The original trainers save `{"state_dict", "epoch", "optimizer", "scheduler", "val_result"}` with
`torch.save`; the scheduler entry pickles whole objects, so `torch.load(weights_only=True)` refuses
such files, and `torch.load` without it would run whatever the file names. `safe_load` runs
nothing from the file: its pickles go through the restricted unpickler of `pickles.py` (only
tensor rebuilds, `OrderedDict` and sets are resolved; everything else becomes an inert
placeholder; each pickle is scanned and bounded first), and storages are read here as raw bytes,
from the zip archive (torch >= 1.6 default) or from the tail of a legacy (pre-1.6) file.

Sizes are bounded before anything is built (a hostile 1 kB file must fail fast), besides the
pickle and tensor bounds of `pickles.py`:

* zip archives: member count, every member's declared size against the archive's size, stored
  (uncompressed, as torch writes) members' declared vs. actual size, a compression-ratio cap for
  compressed members (zip bombs), the records read together against the archive's size (records
  whose bytes overlap would read the file many times over), and each storage's byte size against
  the element count its persistent id declares;
* legacy files: the storages' declared sizes must fit in the file before anything is allocated.
"""
from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import torch

from ..errors import short_repr
from .pickles import (MAX_OPCODES, MAX_PICKLE_BYTES, Placeholder, Storage,  # noqa: F401
                      UnpickleError, Unpickler, flat_tensor, placeholder_class, scan_pickle,
                      nonneg_ints, storage_dtype)

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
MAX_MEMBERS = 100_000
MAX_RATIO = 20                # compressed zip members (torch stores them uncompressed)


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
    spent = [0]  # bytes of the file taken by the records read so far

    def member(name):
        """`_member`, and the records read together must fit in the file once: records whose
        bytes overlap (one record's data holding the next one, ...) would read it many times."""
        info = _member(zf, name, path, size)
        spent[0] += info.compress_size
        if spent[0] > size:
            raise UnpickleError(f"{path}: its records take {spent[0]} bytes of a {size}-byte file: "
                                f"they overlap (a zip bomb); refused")
        return info

    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        if len(names) > MAX_MEMBERS:
            raise UnpickleError(f"{path} has {len(names)} records: not a torch checkpoint")
        pkl = [n for n in names if n.endswith("data.pkl")]
        if not pkl:
            raise UnpickleError(f"{path} is a zip file but not a torch checkpoint (no data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names:
            order = _read(zf, member(f"{prefix}byteorder"), path)
            if order.strip() != b"little":
                raise UnpickleError(f"{path} was written on a big-endian machine: not supported")
        cache: dict = {}

        def load_storage(pid):
            if len(pid) < 5:
                raise UnpickleError(f"{path}: malformed storage record {short_repr(pid)}")
            _, storage_type, key, _location, numel, *_ = pid
            dtype = storage_dtype(storage_type)
            if key not in cache:
                info = member(f"{prefix}data/{key}")
                item = torch.empty((), dtype=dtype).element_size()
                if not isinstance(numel, int) or info.file_size != numel * item:
                    raise UnpickleError(f"{path}: storage {short_repr(key)} declares {short_repr(numel)} "
                                        f"{dtype} elements but its record holds {info.file_size} bytes")
                cache[key] = Storage(flat_tensor(_read(zf, info, path), torch.uint8), dtype)
            byte = cache[key].flat
            return Storage(byte.view(dtype) if byte.numel() else torch.empty(0, dtype=dtype), dtype)

        info = member(pkl[0])
        if info.file_size > MAX_PICKLE_BYTES:
            raise UnpickleError(f"{path}: data.pkl declares {info.file_size} bytes, over the "
                                f"{MAX_PICKLE_BYTES} a checkpoint's structure needs")
        data = _read(zf, info, path)
        scan_pickle(data, path)
        return Unpickler(io.BytesIO(data), load_storage).load()


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
            dtype = storage_dtype(storage_type)
            if key not in roots:
                item = torch.empty((), dtype=dtype).element_size()
                if not isinstance(numel, int) or numel < 0 or declared[0] + numel * item > size:
                    raise UnpickleError(f"{path}: storage {short_repr(key)} declares "
                                        f"{short_repr(numel)} elements, more than the file holds")
                declared[0] += numel * item
                roots[key] = Storage(torch.empty(numel, dtype=dtype), dtype)
            root = roots[key]
            if view is not None:  # (view_key, offset, size): a slice of the root storage
                if not isinstance(view, tuple) or len(view) != 3:
                    raise UnpickleError(f"{path}: malformed storage view {short_repr(view)}")
                off, n = nonneg_ints(view[1:], "view")
                if off + n > root.flat.numel():
                    raise UnpickleError(f"{path}: storage view {short_repr(view)} lies outside its storage")
                return Storage(root.flat[off:off + n], dtype)
            return root

        def read(with_storage=False):
            start = f.tell()
            data = f.read(MAX_PICKLE_BYTES + 1)
            scan_pickle(data[:MAX_PICKLE_BYTES] if len(data) > MAX_PICKLE_BYTES else data, path)
            f.seek(start)
            return Unpickler(f, load_storage if with_storage else _no_storage).load()

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
            flat.copy_(flat_tensor(raw, flat.dtype))
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
