"""Mutation testing of fastprompt: apply each semantic mutation of `mutations.py` and run the tests
that should catch it; print which were killed and which survived.

    python tests/mutation/run.py                 # every mutation, its relevant tests
    python tests/mutation/run.py --only lamm     # mutations whose name contains "lamm"
    python tests/mutation/run.py --full          # the whole suite for each mutation (slow)
    python tests/mutation/run.py --guard golden  # only each mutation's tests whose id holds "golden"
    python tests/mutation/run.py --list          # the mutations, nothing run

The working tree is never edited: the package (fastprompt/ with kernels/ and export/ placed where
they are installed), tests/ and pyproject.toml are copied to a temporary directory, which is put
first on PYTHONPATH; each mutation edits that copy and is undone before the next (the copy is
deleted at the end, also on Ctrl-C). The tests run there with `pytest -x`; the golden tests find
the parity data through FASTPROMPT_PARITY. Tests that already fail without any mutation (the
baseline run) are deselected, so they cannot "kill" anything. Exit status 0 when every mutation was
killed, 1 when one survived, 2 on a stale mutation (its text no longer in the file).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutations import MUTATIONS, Mutation  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "mutation")


def make_copy(dest: Path) -> None:
    """The installed layout (fastprompt.kernels = kernels/, fastprompt.export = export/) + tests."""
    shutil.copytree(REPO / "fastprompt", dest / "fastprompt", ignore=IGNORE)
    shutil.copytree(REPO / "kernels", dest / "fastprompt" / "kernels", ignore=IGNORE)
    shutil.copytree(REPO / "export", dest / "fastprompt" / "export", ignore=IGNORE)
    shutil.copytree(REPO / "tests", dest / "tests", ignore=IGNORE)
    shutil.copy2(REPO / "pyproject.toml", dest / "pyproject.toml")


def copy_path(root: Path, path: str) -> Path:
    """Where a repository path lives in the copy."""
    for top in ("kernels", "export"):
        if path.startswith(top + "/"):
            return root / "fastprompt" / path
    return root / path


def environment(root: Path) -> dict:
    parity = os.environ.get("FASTPROMPT_PARITY") or str(REPO.parent / "shared" / "parity")
    return {**os.environ, "PYTHONPATH": str(root), "FASTPROMPT_PARITY": parity,
            "PYTHONDONTWRITEBYTECODE": "1"}


def check_imports(root: Path) -> None:
    code = "import fastprompt, fastprompt.kernels as k; print(fastprompt.__file__); print(k.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=environment(root),
                         capture_output=True, text=True, check=True).stdout.split()
    if not all(Path(p).resolve().is_relative_to(root.resolve()) for p in out):
        raise SystemExit(f"the copy is not the package imported ({out}): is fastprompt installed "
                         f"in a way PYTHONPATH cannot override?")


def pytest(root: Path, tests, deselect=(), timeout: float = 1800) -> tuple[int, list[str], float]:
    """(exit status, the failing tests, seconds) of `pytest -x` over `tests` in the copy."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider",
           "-W", "ignore", *tests]
    for node in deselect:
        cmd += ["--deselect", node]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=environment(root), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, ["(timeout)"], time.perf_counter() - t0
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, flags=re.M)
    return proc.returncode, failed, time.perf_counter() - t0


def baseline_failures(root: Path, tests) -> list[str]:
    """Tests that fail before any mutation (run without -x so all of them are found)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    proc = subprocess.run(cmd, cwd=root, env=environment(root), capture_output=True, text=True)
    return re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, flags=re.M)


def run_one(root: Path, m: Mutation, tests, deselect) -> tuple[str, str, float]:
    target = copy_path(root, m.path)
    original = target.read_text()
    if original.count(m.old) != 1:
        return "stale", f"'{m.old[:50]}' occurs {original.count(m.old)} times in {m.path}", 0.0
    try:
        target.write_text(original.replace(m.old, m.new))
        code, failed, secs = pytest(root, tests, deselect)
    finally:
        target.write_text(original)
    if code == 5:
        return "no tests", "pytest collected nothing (all deselected?)", secs
    if code == 0:
        return "SURVIVED", "", secs
    return "killed", failed[0] if failed else f"pytest exit {code}", secs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", action="append", default=[], help="run mutations whose name contains this")
    ap.add_argument("--full", action="store_true", help="run the whole test suite for each mutation")
    ap.add_argument("--guard", default="", help="keep only the tests whose id contains this (to see "
                    "whether one guard alone, e.g. the golden tests, catches each mutation)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or any(s in m.name for s in args.only)]
    if args.guard:
        chosen = [dataclasses.replace(m, tests=tuple(t for t in m.tests if args.guard in t)) for m in chosen]
        chosen = [m for m in chosen if m.tests]
    if args.list or not chosen:
        for m in MUTATIONS:
            print(f"{m.name:42s} {m.path:32s} {m.what}")
        return 0 if args.list else 2
    with tempfile.TemporaryDirectory(prefix="fastprompt-mutation-") as tmp:
        root = Path(tmp)
        make_copy(root)
        check_imports(root)
        union = ["tests"] if args.full else list(dict.fromkeys(t for m in chosen for t in m.tests))
        t0 = time.perf_counter()
        broken = baseline_failures(root, union)
        print(f"baseline ({time.perf_counter() - t0:.0f} s): "
              + (f"{len(broken)} test(s) already failing, deselected: {' '.join(broken)}" if broken
                 else "all selected tests pass"), flush=True)
        results = []
        for m in chosen:
            tests = ["tests"] if args.full else list(m.tests)
            status, detail, secs = run_one(root, m, tests, broken)
            results.append((m, status))
            print(f"{status:9s} {m.name:42s} {secs:6.0f} s  {detail or m.what}", flush=True)
    counts = {s: sum(1 for _, r in results if r == s) for s in dict.fromkeys(r for _, r in results)}
    print("summary: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    survivors = [m.name for m, s in results if s == "SURVIVED"]
    if survivors:
        print("survived: " + ", ".join(survivors))
    return 2 if "stale" in counts else (1 if survivors or "no tests" in counts else 0)


if __name__ == "__main__":
    sys.exit(main())
