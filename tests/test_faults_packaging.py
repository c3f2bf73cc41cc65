"""What the wheel holds (setup.py's package discovery) and the extras, without building anything.
The wheel itself is built, installed and checked from outside the checkout by .ci/run."""
import runpy
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup_kwargs():
    import setuptools

    seen = {}
    original = setuptools.setup
    setuptools.setup = lambda **kw: seen.update(kw)
    try:
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    finally:
        setuptools.setup = original
    return seen


def _source_packages() -> set[str]:
    mounted = {"fastprompt": "fastprompt", "kernels": "fastprompt.kernels",
               "export": "fastprompt.export"}
    found = set()
    for folder, name in mounted.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join([name, *rel]))
    return found


def test_every_package_of_the_checkout_goes_into_the_wheel(setup_kwargs):
    packages = set(setup_kwargs["packages"])
    assert _source_packages() <= packages  # fastprompt.original was once left out
    assert "fastprompt.original" in packages
    assert not any(p.split(".")[0] in ("kernels", "export") for p in packages)
    assert setup_kwargs["package_dir"]["fastprompt.kernels"] == "kernels"
    assert setup_kwargs["package_dir"]["fastprompt.export"] == "export"


def test_extras_export_and_tensorrt_includes_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    names = {req.split(">")[0].split("<")[0].split("=")[0].strip() for req in extras["export"]}
    assert names == {"onnx", "onnxruntime", "onnxscript"}
    assert "fastprompt[export]" in extras["tensorrt"] and "fastprompt[export]" in extras["dev"]


def test_missing_optional_package_names_the_extra(monkeypatch, tmp_path, capsys):
    """No onnxruntime: export says which extra to install and writes nothing."""
    import sys

    from fastprompt.export.__main__ import main

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # "import onnxruntime" now fails
    out = tmp_path / "m.onnx"
    code = main(["--run", str(tmp_path / "nope"), "--format", "onnx", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "onnxruntime is not installed" in err and "pip install 'fastprompt[export]'" in err
    assert list(tmp_path.iterdir()) == []
