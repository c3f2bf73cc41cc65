"""Hostile `torch.save` files for the original-checkpoint reader: each fails fast with one line."""
import io
import pickle
import struct
import time
import zipfile

import pytest
import torch

from fastprompt.original import OriginalCheckpointError, read_state_dict
from fastprompt.original.unpickle import UnpickleError, safe_load


def _fast(fn, limit_s=5.0):
    t0 = time.perf_counter()
    with pytest.raises(UnpickleError) as exc:
        fn()
    assert time.perf_counter() - t0 < limit_s
    assert "\n" not in str(exc.value) and len(str(exc.value)) < 400
    return str(exc.value)


def test_shared_reference_bomb_is_not_formatted(tmp_path):
    """2**40 list elements through shared references: a full repr would never finish."""
    nested: list = []
    for _ in range(40):
        nested = [nested, nested]
    path = tmp_path / "bomb.pth.tar"
    torch.save({"state_dict": {"prompt_learner.ctx": nested}}, path)
    assert path.stat().st_size < 10_000
    t0 = time.perf_counter()
    with pytest.raises(OriginalCheckpointError, match="is not a tensor \\(<list of 2 items>\\)"):
        read_state_dict("coop", path)
    assert time.perf_counter() - t0 < 5


def test_huge_memo_index_is_refused(tmp_path):
    """LONG_BINPUT 2**31-16 would make the C unpickler allocate a 16 GB memo."""
    data = b"\x80\x02N" + b"r" + struct.pack("<I", 2**31 - 16) + b"."
    path = tmp_path / "memo.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data)
    assert "memo slot" in _fast(lambda: safe_load(path))


def test_opcode_flood_is_refused(tmp_path, monkeypatch):
    import fastprompt.original.pickles as pickles  # the pickle bounds live there
    monkeypatch.setattr(pickles, "MAX_OPCODES", 1000)
    path = tmp_path / "flood.pth"
    torch.save({"state_dict": {}, "junk": list(range(5000))}, path)
    assert "opcodes" in _fast(lambda: safe_load(path))


def _rewrite(src, dst, compress=None, replace=None):
    """Copy a torch zip checkpoint, deflating / replacing the storage records."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if "/data/" in info.filename and replace is not None:
                data = replace(data)
            kind = compress if "/data/" in info.filename and compress else zipfile.ZIP_STORED
            zout.writestr(info.filename, data, compress_type=kind)


def test_zip_bomb_record_is_refused(tmp_path):
    src, bomb = tmp_path / "ok.pth", tmp_path / "bomb.pth"
    torch.save({"state_dict": {"ctx": torch.zeros(2_500_000)}}, src)  # 10 MB of zeros
    _rewrite(src, bomb, compress=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 200_000
    assert "zip bomb" in _fast(lambda: safe_load(bomb))


def test_storage_size_must_match_what_it_declares(tmp_path):
    src, bad = tmp_path / "ok.pth", tmp_path / "short.pth"
    torch.save({"state_dict": {"ctx": torch.ones(100)}}, src)
    _rewrite(src, bad, replace=lambda data: data[:40])
    assert "declares 100" in _fast(lambda: safe_load(bad))


def test_expanded_view_beyond_its_storage_is_refused(tmp_path):
    path = tmp_path / "expand.pth"
    torch.save({"state_dict": {"ctx": torch.zeros(1).expand(10**6, 10**6)}}, path)
    assert "more than its storage" in _fast(lambda: safe_load(path))


class _HugeStoragePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, str) and obj == "STORAGE":
            return ("storage", torch.FloatStorage, "0", "cpu", 10**12)
        return None


def test_legacy_storage_larger_than_the_file_is_refused(tmp_path):
    """A pre-1.6 file that declares a 4 TB storage: refused before any allocation."""
    buf = io.BytesIO()
    for obj in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001}):
        pickle.dump(obj, buf, protocol=2)
    _HugeStoragePickler(buf, protocol=2).dump({"state_dict": {"ctx": "STORAGE"}})
    pickle.dump(["0"], buf, protocol=2)
    path = tmp_path / "legacy.pth"
    path.write_bytes(buf.getvalue())
    assert "more than the file holds" in _fast(lambda: safe_load(path))


def test_truncated_and_garbage_files_are_one_line(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"state_dict": {"ctx": torch.ones(1000)}}, good)
    data = good.read_bytes()
    for i, blob in enumerate([data[: len(data) // 2], b"\x00" * 100, b"PK\x03\x04" + b"\xff" * 60, b""]):
        path = tmp_path / f"bad{i}.pth"
        path.write_bytes(blob)
        _fast(lambda: safe_load(path))
