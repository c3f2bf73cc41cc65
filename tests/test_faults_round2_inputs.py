"""Hostile input, round 2 (issue #28): each case was a traceback, a hang, unbounded memory or a
silently wrong setting; now it is one line and exit 2 (or it works), in bounded time."""
import json
import os
import pickle
import threading
import time

import numpy as np
import pytest
import torch
from common import CLASSNAMES, tiny_clip
from PIL import Image
from test_faults_cli import folder_dataset, one_line_error, run

import fastprompt as fp
from fastprompt.errors import FastpromptError, InputError

ZS = ["--method", "zeroshot", "--no-progress"]


def _pets(root, entries):
    """A CoOp-layout oxford_pets whose split file holds `entries` in its train list."""
    d = root / "oxford_pets"
    (d / "images").mkdir(parents=True)
    (d / "split_zhou_OxfordPets.json").write_text(
        entries if isinstance(entries, str) else json.dumps({"train": entries, "val": [], "test": []}))
    return root


# ------------------------------------------------------------------- digits and deep nesting
@pytest.mark.parametrize("split, needle", [
    ([["a.jpg", "²", "cat"]], "entry 0 of 'train'"),            # isdigit() but not int()
    ([["a.jpg", "١", "cat"]], "entry 0 of 'train'"),            # int() but not ASCII
    ([["a.jpg", "9" * 5000, "cat"]], "entry 0 of 'train'"),     # past int()'s digit limit
    ('{"train": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ('{"train": [["a.jpg", 1e999, "cat"]]}', "out of range"),
], ids=["superscript", "arabic-indic", "5000-digits", "nested", "1e999"])
def test_split_files_that_lie_are_one_line(split, needle, tmp_path, capsys):
    root = _pets(tmp_path, split)
    with pytest.raises(fp.data.DataError, match=needle):
        fp.data.load_dataset("oxford_pets", root)
    code, _, err = run([*ZS, "--dataset", "oxford_pets", "--data-root", str(root), "--out",
                        str(tmp_path / "r")], capsys)
    one_line_error(code, err, needle)


def test_imagenetv2_folder_names_that_are_not_ascii_numbers(tmp_path):
    d = tmp_path / "imagenetv2"
    (d / "imagenetv2-matched-frequency-format-val" / "²").mkdir(parents=True)
    (d / "classnames.txt").write_text("n01 tench\nn02 goldfish\n")
    with pytest.raises(fp.data.DataError, match="is not a class of classnames.txt"):
        fp.data.load_dataset("imagenetv2", tmp_path)


# ------------------------------------------------------------------- config.json, config files
def test_backbone_seed_beyond_64_bits_is_one_line(tmp_path, capsys):
    run_dir = fp.save(fp.create("coop", tiny_clip(), CLASSNAMES), tmp_path / "r")
    config = json.loads((run_dir / "config.json").read_text())
    config["backbone"].update(pretrained=None, seed=2**64 + 5)
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(fp.checkpoint.CheckpointError, match="'backbone.seed' .* outside 0..4294967295"):
        fp.load(run_dir)
    code, _, err = run(["--eval-only", "--run", str(run_dir), "--no-progress"], capsys)
    one_line_error(code, err, "'backbone.seed'")
    with pytest.raises(fp.errors.BackboneError, match="seed must be an integer from 0 to 2\\*\\*64-1"):
        fp.load_clip("tiny", None, seed=2**70)


def test_yaml_aliases_are_refused_in_bounded_time_and_memory(tmp_path, capsys):
    """Nine levels of nine aliases: 9**10 = 3.5G strings once expanded, from 600 bytes."""
    import tracemalloc

    levels = ["    l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("method: coop\noptions:\n  ctx_init:\n" + "\n".join(levels) + "\n")
    assert path.stat().st_size < 600
    tracemalloc.start()
    t0 = time.perf_counter()
    code, _, err = run(["--config", str(path), "--out", str(tmp_path / "r")], capsys)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    one_line_error(code, err, "aliases (*name) are not accepted")
    assert time.perf_counter() - t0 < 10 and peak < 50e6


@pytest.mark.parametrize("flags, text, needle", [
    (["--lr", "1e39"], None, "--lr (lr=) must be at most 3.403e+38"),
    ([], "warmup_lr: 1.0e+39\n", "'warmup_lr' in {path} must be a finite number"),
    ([], "weight_decay: 1.0e+300\n", "'weight_decay' in {path} must be a finite number"),
    ([], "lr: 1.0e+39\n", "'lr' in {path} must be a finite number"),
    (["--method", "mma", "--opt", "text_scale=1e39"], None, "'text_scale' of method 'mma' must be"),
])
def test_numbers_past_float32_are_refused(flags, text, needle, tmp_path, capsys):
    """Finite in Python, inf in the float32 optimizer: a RuntimeError traceback from torch's SGD."""
    data = folder_dataset(tmp_path / "flowers")
    argv = ["--method", "coop", *flags, "--dataset", "folder", "--data-root", str(data),
            "--subsample", "all", "--shots", "1", "--epochs", "2", "--batch-size", "1",
            "--no-progress", "--out", str(tmp_path / "r")]
    path = tmp_path / "c.yaml"
    if text:
        path.write_text(text)
        argv += ["--config", str(path)]
    code, _, err = run(argv, capsys)
    one_line_error(code, err, needle.format(path=path))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("field, value, needle", [
    ("epochs", 1.5, "TrainConfig field 'epochs' must be an integer"),
    ("shots", "16", "TrainConfig field 'shots' must be an integer"),
    ("eval_datasets", "dtd", "'eval_datasets' must be a list of dataset names"),
    ("recipe_overrides", {"warmup_lr": "1e-5"}, "'warmup_lr' must be a finite number"),
])
def test_library_configs_of_the_wrong_type_are_one_line(field, value, needle, tmp_path):
    config = fp.TrainConfig(method="zeroshot", out=str(tmp_path / "r"), **{field: value})
    with pytest.raises(InputError, match=needle):
        fp.fit(config)
    assert not (tmp_path / "r").exists()
    paths = fp.TrainConfig(out=tmp_path / "r", data_root=tmp_path).validate()  # Paths are fine
    assert (paths.out, paths.data_root) == (str(tmp_path / "r"), str(tmp_path))


# ------------------------------------------------------------------- backbone weight files
def _weights(tmp_path, kind):
    path = tmp_path / {"text": "w.pt", "corrupt": "w.safetensors", "list": "l.pt",
                       "fifo": "f.pt"}[kind]
    if kind == "text":
        path.write_text("these are not weights\n")
    elif kind == "corrupt":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    elif kind == "list":
        torch.save([1, 2, 3], path)
    else:
        os.mkfifo(path)
    return path


@pytest.mark.parametrize("model", ["tiny", "ViT-S-32"])
@pytest.mark.parametrize("kind, needle", [("text", "is not a weights file"),
                                          ("corrupt", "is not a weights file"),
                                          ("list", "list")])
def test_pretrained_files_that_are_not_weights(kind, needle, model, tmp_path, capsys):
    """open_clip's path (ViT-S-32) and the tiny model's own loader: tracebacks before."""
    path = _weights(tmp_path, kind)
    t0 = time.perf_counter()
    with pytest.raises(fp.errors.BackboneError, match=needle):
        fp.load_clip(model, str(path))
    code, _, err = run([*ZS, "--model", model, "--pretrained", str(path), "--out",
                        str(tmp_path / "r")], capsys)
    one_line_error(code, err, needle)
    assert time.perf_counter() - t0 < 60 and not (tmp_path / "r").exists()


# ------------------------------------------------------------------- prompts and class names
def test_a_prompt_too_long_for_the_context_is_said_so(tmp_path, capsys):
    for method, options in [("coop", {"n_ctx": 100, "ctx_init": ""}),
                            ("maple", {"n_ctx": 1000, "ctx_init": ""}),
                            ("zeroshot", {"templates": ["a very " * 80 + "{}."]})]:
        with pytest.raises(InputError, match="too long for the text encoder's context length of 77"):
            fp.create(method, tiny_clip(), CLASSNAMES, **options)
    with pytest.raises(InputError, match="too long for the text encoder's context length of 77"):
        fp.create("coop", tiny_clip(), ["tulip", "x" * 400])  # one word of many tokens: truncated
    for n_ctx in (100_000, 10**8):  # the prompt's text alone would take gigabytes
        t0 = time.perf_counter()
        with pytest.raises(InputError, match="must be <= 1024.*too long for the text encoder's "):
            fp.create("coop", tiny_clip(), CLASSNAMES, n_ctx=n_ctx, ctx_init="")
        assert time.perf_counter() - t0 < 1
    code, _, err = run([*ZS, "--template", "a very " * 80 + "{}.", "--out", str(tmp_path / "r")],
                       capsys)
    one_line_error(code, err, "is too long for the text encoder's context length")


def test_one_string_is_not_a_list_of_class_names():
    with pytest.raises(InputError, match=r"not one string: pass \['cat'\]"):
        fp.create("coop", tiny_clip(), "cat")


@pytest.mark.parametrize("names, folders", [(("Rose", "rose"), "give the same prompt"),
                                            (("Sun Flower", "sun  flower"), "give the same prompt"),
                                            (("sports_car", "sports car"), "duplicate class names")])
def test_classes_with_the_same_prompt_are_refused(names, folders, tmp_path, capsys):
    """The tokenizer lower-cases and folds white space, '_' is a space in a prompt (and in a
    folder's class name): two classes, one prompt, a classifier that cannot tell them apart."""
    with pytest.raises(InputError, match="give the same prompt"):
        fp.create("coop", tiny_clip(), ["tulip", *names])
    data = folder_dataset(tmp_path / "flowers", classes=("tulip", *names))
    code, _, err = run([*ZS, "--dataset", "folder", "--data-root", str(data), "--subsample", "all",
                        "--out", str(tmp_path / "r")], capsys)
    one_line_error(code, err, folders)


# ------------------------------------------------------------------- images, original checkpoints
def test_a_large_16_bit_grey_png_is_read_not_dropped(tmp_path):
    """Above 8x the input size the image is reduced: Pillow's reduce() has no 16-bit modes."""
    from fastprompt.data.decode import open_rgb

    grey = (np.arange(400 * 400) % 256).reshape(400, 400).astype(np.uint16)
    Image.frombytes("I;16", (400, 400), (grey * 257).astype("<u2").tobytes()).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode.startswith("I;16")
    rgb = np.asarray(open_rgb(tmp_path / "g.png", 32))
    assert rgb.shape == (134, 134, 3) and rgb.dtype == np.uint8
    eight = np.asarray(Image.fromarray(grey.astype(np.uint8)).reduce(3))
    assert np.abs(rgb[..., 0].astype(int) - eight).max() <= 1  # the 8-bit picture, reduced


def test_state_dict_keys_that_are_not_strings(tmp_path):
    from fastprompt.original import OriginalCheckpointError, read_state_dict

    for bad in [{1: torch.zeros(2)}, {"state_dict": {("a",): torch.zeros(2)}}]:
        path = tmp_path / "model.pth.tar-1"
        torch.save(bad, path)
        with pytest.raises(OriginalCheckpointError, match="is not a string"):
            read_state_dict("coop", path)


def _overlapping_zip(path, k: int, blob: int) -> None:
    """A torch zip whose k storage records nest: record i's bytes hold record i+1's header and
    data, so every record lies inside the file and the k of them together read it k times."""
    import struct
    import zlib

    class Store:
        def __init__(self, key, size):
            self.key, self.size = key, size

    class Tensor:
        def __init__(self, store):
            self.store = store

        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (self.store, 0, (self.store.size,), (1,),
                                                     False, {})

    names = [f"archive/data/{i}" for i in range(k)]
    chain, tail = [], b"\x00" * blob
    for name in reversed(names):
        crc, size = zlib.crc32(tail), len(tail)
        header = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 33, crc, size, size,
                             len(name), 0) + name.encode()
        chain.insert(0, (name, crc, size))
        tail = header + tail

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.ByteStorage, obj.key, "cpu", obj.size) \
                if isinstance(obj, Store) else None

    buf = __import__("io").BytesIO()
    Pickler(buf, protocol=2).dump({"state_dict": {f"t{i}": Tensor(Store(str(i), s))
                                                  for i, (_, _, s) in enumerate(chain)}})
    pkl = buf.getvalue()
    records = [("archive/data.pkl", zlib.crc32(pkl), len(pkl))] + chain
    head = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 33, records[0][1], len(pkl),
                       len(pkl), len(records[0][0]), 0) + records[0][0].encode() + pkl
    body, offsets, at = head + tail, [0], len(head)
    for name, _, _ in chain:
        offsets.append(at)
        at += 30 + len(name)
    central = b"".join(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 33, crc,
                                   size, size, len(name), 0, 0, 0, 0, 0, off) + name.encode()
                       for (name, crc, size), off in zip(records, offsets))
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(records), len(records), len(central),
                      len(body), 0)
    path.write_bytes(body + central + end)


def test_a_torch_zip_with_overlapping_records_is_refused_fast(tmp_path):
    from fastprompt.original.unpickle import UnpickleError, safe_load

    path = tmp_path / "nested.pth"
    _overlapping_zip(path, k=300, blob=1 << 20)  # 1.0 MB on disk, 300 MB if read record by record
    assert path.stat().st_size < 1.2e6
    t0 = time.perf_counter()
    with pytest.raises(UnpickleError, match="they overlap"):
        safe_load(path)
    assert time.perf_counter() - t0 < 5
    _overlapping_zip(path, k=1, blob=64)  # one record, nothing overlaps: read as before
    assert safe_load(path)["state_dict"]["t0"].numel() == 64


@pytest.mark.parametrize("model", ["tiny", "ViT-S-32"])
def test_a_pretrained_fifo_does_not_block(model, tmp_path):
    """Reading a FIFO waits for a writer: forever, before."""
    fifo, caught = _weights(tmp_path, "fifo"), []

    def load():
        try:
            fp.load_clip(model, str(fifo))
        except FastpromptError as err:
            caught.append(str(err))

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(60)
    if thread.is_alive():  # blocked: give it a writer so that the thread ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert not thread.is_alive() and "is not a regular file" in caught[0]


def test_a_pretrained_fifo_does_not_block_the_cli(tmp_path):
    import subprocess
    import sys

    fifo = _weights(tmp_path, "fifo")
    proc = subprocess.Popen([sys.executable, "-m", "fastprompt.train", *ZS, "--pretrained",
                             str(fifo), "--out", str(tmp_path / "r")], stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    try:
        err = proc.communicate(timeout=120)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        err = proc.communicate()[1]
    assert proc.returncode == 2 and "is not a regular file" in err and err.count("\n") == 1, err
