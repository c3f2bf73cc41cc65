"""No wrong number out, round 2 (issue #28): ONNX files whose metadata lies, NaN logits in an
evaluation, the table's README and JSON, writes through links and onto a full disk."""
import errno
import json
import os

import pytest
import torch
from common import CLASSNAMES, tiny_clip
from PIL import Image
from test_faults_cli import folder_dataset, one_line_error, run

import fastprompt as fp
from fastprompt.predict import main as predict


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A coop run over the five CLASSNAMES, its ONNX export and an image."""
    from fastprompt.export import export_onnx

    tmp = tmp_path_factory.mktemp("onnx")
    run_dir = fp.save(fp.create("coop", tiny_clip(), CLASSNAMES), tmp / "run")
    path = export_onnx(run_dir, tmp / "m.onnx", log=lambda *_: None).path
    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp / "img.png")
    return run_dir, path, tmp / "img.png"


def _with_metadata(src, dst, **changes):
    import onnx

    proto = onnx.load(str(src))
    for p in proto.metadata_props:
        if p.key in changes:
            p.value = changes[p.key]
    onnx.save(proto, str(dst))
    return dst


@pytest.mark.parametrize("key, value, needle", [
    ("classnames", json.dumps(CLASSNAMES[:4]), "outputs [[...]]"),      # fewer names than logits
    ("classnames", json.dumps(CLASSNAMES + ["owl"]), "outputs [[...]]"),  # more: wrong labels
    ("std", "[1e-300, 0.26, 0.27]", "metadata 'std' of"),                # 0 in float32
    ("std", "[1e-40, 0.26, 0.27]", "metadata 'std' of"),                 # inf once divided
    ("image_size", "²", "metadata 'image_size' of"),                      # isdigit(), not int()
    ("image_size", "64", "takes [[...]]"),                                # the graph takes 32
])
def test_onnx_metadata_that_lies_is_one_line(key, value, needle, exported, tmp_path, capsys):
    _, path, img = exported
    bad = _with_metadata(path, tmp_path / "bad.onnx", **{key: value})
    code = predict(["--model", str(bad), str(img)])
    out = capsys.readouterr()
    one_line_error(code, out.err, needle.split("[[")[0])
    assert out.out == ""  # no label printed


def _graph(tmp_path, out_shape, reduce_axes, keep, names, in_shape=("B", 3, 32, 32)):
    """A hand-made ONNX classifier: the mean over `reduce_axes` of an `in_shape` input, with
    fastprompt's metadata naming `names`; the output declared as `out_shape`."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("ReduceMean", ["images", "axes"], ["logits"], keepdims=keep)
    axes = helper.make_tensor("axes", TensorProto.INT64, [len(reduce_axes)], reduce_axes)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)], [axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    meta = {"classnames": json.dumps(names), "image_size": "32", "mean": "[0.5, 0.5, 0.5]",
            "std": "[0.5, 0.5, 0.5]", "output": "logits", "method": "coop"}
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    path = tmp_path / "hand.onnx"
    onnx.save(model, str(path))
    return path


SIZED = ("B", 3, "H", "W")  # a graph that fixes no image size: its output size shows at run time


@pytest.mark.parametrize("out_shape, axes, keep, names, in_shape, needle", [
    (["B", "C"], [2, 3], 0, ["a", "b"], None, "outputs [['B', 3]], not [B, 2]"),  # fewer names
    (["B", "C"], [2, 3], 0, list("abcd"), None, "outputs [['B', 3]], not [B, 4]"),  # more names
    (["B", 3, 1, 1], [2, 3], 1, list("abc"), None, "outputs [['B', 3, 1, 1]]"),   # not [B, C]
    (["B", "C", "D"], [3], 0, list("abc"), None, "outputs [['B', 3, 32]]"),
    (["B", "C"], [1, 3], 0, list("abc"), SIZED, "gave an output of shape [1, 32]"),
])
def test_graphs_whose_output_is_not_b_by_classes(out_shape, axes, keep, names, in_shape, needle,
                                                 exported, tmp_path, capsys):
    """Onnxruntime knows the output's size when the graph fixes it (refused on opening), else
    it shows in the result (refused then); predict printed wrong labels or a traceback."""
    img = exported[2]
    path = _graph(tmp_path, out_shape, axes, keep, names, in_shape or ("B", 3, 32, 32))
    code = predict(["--model", str(path), str(img)])
    out = capsys.readouterr()
    one_line_error(code, out.err, needle)
    assert out.out == ""


def test_a_truthful_hand_made_graph_still_predicts(exported, tmp_path, capsys):
    path = _graph(tmp_path, ["B", "C"], [2, 3], 0, ["red", "green", "blue"])
    assert predict(["--model", str(path), str(exported[2])]) == 0
    assert capsys.readouterr().out.split(": ")[1].startswith("red ")


def test_eval_only_refuses_nan_logits(tmp_path, capsys):
    """Finite tensors whose logits are NaN: predict refused the model, --eval-only scored it
    (argmax of NaN rows is class 0: 33.33 % on three classes) and printed that."""
    data = folder_dataset(tmp_path / "flowers")
    code, _, err = run(["--method", "coop", "--dataset", "folder", "--data-root", str(data),
                        "--subsample", "all", "--shots", "1", "--epochs", "0", "--no-progress",
                        "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    model = fp.load(tmp_path / "r")
    with torch.no_grad():
        model.ctx.fill_(1e30)  # finite, so fp.save and fp.load accept it
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    fp.save(model, tmp_path / "r", extra={"run": config["run"]})
    code, stdout, err = run(["--eval-only", "--run", str(tmp_path / "r"), "--no-progress"], capsys)
    lines = [x for x in err.splitlines() if not x.startswith("warning:")]
    assert code == 1 and len(lines) == 1 and "logits hold NaN/inf" in lines[0], err
    assert "acc" not in stdout.split("\n", 1)[-1]


# ------------------------------------------------------------------------------ the table
def _table(tmp_path, rows, readme_bytes=None):
    from fastprompt.table import BEGIN, END

    src = tmp_path / "results.json"
    src.write_text(rows if isinstance(rows, str) else json.dumps(rows))
    readme = tmp_path / "README.md"
    readme.write_bytes(readme_bytes if readme_bytes is not None else
                       f"# t\n{BEGIN}\nold\n{END}\ntail\n".encode())
    return src, readme


GOOD = {"shapes_colour/coop": [{"seed": 1, "base_acc": 80.0, "novel_acc": 60.0, "hm": 68.6}]}


@pytest.mark.parametrize("rows, readme, needle", [
    ({"shapes_colour/coop": [{"seed": 1, "base_acc": "80", "novel_acc": 60.0, "hm": 68.0}]},
     None, "'base_acc' of 'shapes_colour/coop' is '80', not a percentage"),
    ({"shapes_colour/coop": [{"seed": 1, "base_acc": 80.0, "novel_acc": 60.0, "hm": 68.6},
                             {"seed": "2", "base_acc": 80.0, "novel_acc": 60.0, "hm": 68.6}]},
     None, "'seed' of 'shapes_colour/coop' is '2', not an integer"),
    ({"shapes_colour/coop": [{"seed": 1, "base_acc": 1e308, "novel_acc": 1e308, "hm": 1e308}]},
     None, "not a percentage"),                                       # inf once averaged
    ('{"shapes_colour/coop": [{"seed": 1, "base_acc": 1e999, "novel_acc": 1, "hm": 1}]}',
     None, "out of range"),
    (GOOD, "<!-- table:end -->\n<!-- table:begin -->\n", "followed by <!-- table:end -->"),
    (GOOD, "caf\xe9 <!-- table:begin -->\n<!-- table:end -->\n", "is not UTF-8 text"),
])
def test_table_from_json_refuses_what_it_cannot_write(rows, readme, needle, tmp_path, capsys):
    from fastprompt.table import main as table

    src, path = _table(tmp_path, rows, None if readme is None else readme.encode("latin-1"))
    before = path.read_bytes()
    code = table(["--from-json", str(src), "--readme", str(path), "--seeds", "1"])
    out = capsys.readouterr()
    one_line_error(code, out.err, needle)
    assert path.read_bytes() == before and "inf" not in out.out and "nan" not in out.out


def test_table_from_json_still_writes_a_good_table(tmp_path, capsys):
    from fastprompt.table import main as table

    src, path = _table(tmp_path, GOOD)
    assert table(["--from-json", str(src), "--readme", str(path)]) == 0
    text = path.read_text()
    assert "| shapes_colour | coop | 80.0 | 60.0 | 68.6 |" in text and text.endswith("tail\n")


# ------------------------------------------------------------------------------ writes
def test_export_out_through_a_link_keeps_the_link(exported, tmp_path, capsys):
    """Written through, as open(path, "w") does: the link stays, its target is the export."""
    from fastprompt.export.__main__ import main as export

    run_dir, _, img = exported
    target = tmp_path / "models" / "v1.onnx"
    target.parent.mkdir()
    target.write_bytes(b"an older export")
    link = tmp_path / "model.onnx"
    link.symlink_to(target)
    assert export(["--run", str(run_dir), "--format", "onnx", "--out", str(link)]) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes()[:4] != b"an o" and predict(["--model", str(link), str(img)]) == 0
    assert sorted(os.listdir(tmp_path / "models")) == ["v1.onnx"]


def test_a_full_disk_names_the_file(tmp_path, monkeypatch, capsys):
    """The error of a write to a full disk carries no file name: the message named none."""
    import fastprompt.files as files
    from fastprompt.table import main as table

    class Full:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    src, _ = _table(tmp_path, GOOD)
    monkeypatch.setattr(files, "open", Full, raising=False)
    code = table(["--from-json", str(src), "--json", str(tmp_path / "out.json")])
    one_line_error(code, capsys.readouterr().err, f"No space left on device: {tmp_path / 'out.json'}")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
