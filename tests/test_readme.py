"""Every Python block of the README runs as written (#29), on the tiny backbone, in an empty folder.

A block that needs a real CLIP's weights or a dataset says so on its first line (`# needs: ...`)
and is skipped by name with that reason. `.ci/check_wheel.py` runs the same blocks against the
installed wheel, from outside the checkout.
"""
import pytest

from readme_blocks import README, python_blocks, run_block

BLOCKS = python_blocks()


def test_the_readme_has_runnable_python_blocks():
    runnable = [b for b in BLOCKS if not b.needs]
    assert len(runnable) >= 3, [b.name for b in BLOCKS]
    text = " ".join(b.code for b in runnable)
    for call in ("fp.load_clip(", "fp.create(", ".predict(", "fp.fit(", "fp.evaluate(", "fp.load("):
        assert call in text, f"no runnable README block shows {call}"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_python_block_runs_as_written(block, tmp_path):
    if block.needs:
        pytest.skip(f"{block.name} needs {block.needs}")
    proc = run_block(block, tmp_path)
    assert proc.returncode == 0, (f"{block.name} failed (exit {proc.returncode}):\n"
                                  f"{proc.stderr[-3000:]}")
    assert "Traceback" not in proc.stderr


def test_block_extraction_names_and_skip_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# T\n\n## Library\n\n```python\nprint(1)\n```\n\n```bash\nls\n```\n\n"
                      "```python\n# needs: ViT-B-16 weights\nimport x\n```\n", encoding="utf-8")
    first, second = python_blocks(readme)
    assert (first.name, first.needs, first.code) == ("README.md:5 (Library)", None, "print(1)\n")
    assert second.needs == "ViT-B-16 weights" and second.id == "line13"
    assert run_block(first, tmp_path).stdout == "1\n"
    assert README.is_file()


def test_install_section_shows_a_regular_install_its_extras_and_an_offline_way():
    """Quick start's install: a non-editable install with extras that pyproject.toml defines, and
    what to do where torch's CPU index cannot be reached."""
    import re

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    text = README.read_text(encoding="utf-8")
    install = text[text.index("**Install.**"):text.index("**Run**")]
    extras = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    regular = re.findall(r'pip install "(?:fastprompt)?(?:\.)?\[(\w+)\](?: @ git\+[^"]+)?"', install)
    assert regular and set(regular) <= set(extras), regular
    assert 'pip install ".[export]"' in install and "git+" in install  # clone, or straight from git
    for family in {extra.split("-")[0] for extra in extras}:  # tensorrt-cu12 is a tensorrt
        assert re.search(rf"\b{family} \(", install), family  # each named, with what it adds
    assert "--no-index --find-links" in install and "download.pytorch.org" in install
