"""Check the installed wheel on its own: `python .ci/check_wheel.py CHECKOUT` run by the wheel's
virtual environment, from a directory outside the checkout (see .ci/run).

* every module of the checkout (fastprompt/, kernels/ -> fastprompt.kernels, export/ ->
  fastprompt.export) imports, and each one's __file__ lies inside this environment: a module the
  wheel left out would otherwise be served from the checkout by an editable install in the
  system site-packages (which a --system-site-packages venv sees);
* nothing named `kernels` or `export` sits at the top of site-packages;
* the shipped weights are in the wheel;
* each command's --help runs (python -m fastprompt, .train, .predict, .export, .convert, .table,
  .pretrain), and a zero-shot run on the built-in data trains and evaluates end to end;
* every Python block of the checkout's README runs as written against the wheel, each in an empty
  folder (tests/readme_blocks.py, as tests/test_readme.py runs them); a block marked
  `# needs: ...` is reported as skipped, by name.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

MOUNTED = {"fastprompt": "fastprompt", "kernels": "fastprompt.kernels", "export": "fastprompt.export"}
COMMANDS = ["fastprompt", "fastprompt.train", "fastprompt.predict", "fastprompt.export",
            "fastprompt.convert", "fastprompt.table", "fastprompt.pretrain"]


def expected_modules(checkout: Path) -> list[str]:
    names = []
    for folder, package in MOUNTED.items():
        for path in sorted((checkout / folder).rglob("*.py")):
            parts = list(path.relative_to(checkout / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts and parts[-1] == "__main__":
                continue  # run by the --help checks below
            names.append(".".join([package, *parts]))
    return names


def readme_blocks(checkout: Path, failures: list) -> str:
    """Run the README's Python blocks with this environment's Python; a summary for the last line."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_blocks", checkout / "tests" / "readme_blocks.py")
    blocks = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = blocks  # its dataclass looks itself up there
    spec.loader.exec_module(blocks)
    ran = 0
    for block in blocks.python_blocks(checkout / "README.md"):
        if block.needs:
            print(f"wheel check: README block {block.name} skipped: needs {block.needs}")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            proc = blocks.run_block(block, Path(tmp), sys.executable)
        ran += 1
        if proc.returncode != 0:
            failures.append(f"README block {block.name}: exit {proc.returncode}: "
                            f"{proc.stderr.strip()[-300:]}")
    return f"{ran} README blocks"


def main(checkout: str) -> int:
    checkout = Path(checkout).resolve()
    env = Path(sys.prefix).resolve()
    assert not Path.cwd().resolve().is_relative_to(checkout), "run this from outside the checkout"
    failures = []
    for name in expected_modules(checkout):
        try:
            module = importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - every failure is reported
            failures.append(f"{name}: import failed: {type(err).__name__}: {err}")
            continue
        where = Path(module.__file__).resolve()
        if not where.is_relative_to(env):
            failures.append(f"{name}: imported from {where}, not from the wheel in {env}")
    site = Path(sysconfig.get_paths()["purelib"])
    for stray in ("kernels", "export"):
        if (site / stray).exists() or (site / f"{stray}.py").exists():
            failures.append(f"{site / stray}: a top-level '{stray}' was installed")
    from fastprompt.clip import packaged_weights

    weights = packaged_weights("shapes")
    if not weights or not Path(weights).resolve().is_relative_to(env):
        failures.append(f"the shipped tiny weights are not in the wheel (found: {weights})")
    for command in COMMANDS:
        proc = subprocess.run([sys.executable, "-m", command, "--help"], capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0 or "usage:" not in proc.stdout:
            failures.append(f"python -m {command} --help: exit {proc.returncode}: "
                            f"{(proc.stderr or proc.stdout).strip()[-300:]}")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "fastprompt.train", "--method", "zeroshot",
                               "--out", os.path.join(tmp, "run"), "--no-progress"],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or "hm" not in proc.stdout:
            failures.append(f"zero-shot run from the wheel: exit {proc.returncode}: "
                            f"{proc.stderr.strip()[-300:]}")
    readme = readme_blocks(checkout, failures)
    for line in failures:
        print(f"wheel check: {line}", file=sys.stderr)
    n = len(expected_modules(checkout))
    print(f"wheel check: {n} modules imported from {env}, {len(COMMANDS)} commands, zero-shot run, "
          f"{readme}: {'FAILED' if failures else 'ok'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
