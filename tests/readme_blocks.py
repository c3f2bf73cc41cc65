"""The README's Python blocks, and running one as a user would (no pytest needed: `.ci/check_wheel.py`
runs them against the installed wheel with these same functions).

A block runs as written, in a fresh interpreter, in an empty folder. A block that needs what a
test machine has not (a real CLIP's weights, a dataset on disk) says so on its first line,
`# needs: WHAT`; it is skipped by its name with that reason, never silently.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
NEEDS = re.compile(r"^#\s*needs:\s*(.+)$")
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


@dataclass
class Block:
    name: str      # "README.md:LINE (section)"
    code: str
    needs: str | None

    @property
    def id(self) -> str:
        return self.name.split(" ", 1)[0].replace("README.md:", "line")


def python_blocks(readme: Path = README) -> list[Block]:
    """Every ```python block of `readme`, named by its first line and its section heading."""
    text = readme.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        code = match.group(1)
        first = code.strip().splitlines()[0] if code.strip() else ""
        needs = NEEDS.match(first)
        blocks.append(Block(f"{readme.name}:{line} ({_section(text[:match.start()])})", code,
                            needs.group(1).strip() if needs else None))
    return blocks


def _section(text: str) -> str:
    """The last Markdown heading of `text`, outside code blocks (a `# comment` in one is none)."""
    heading, fenced = "top", False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#+ ", line):
            heading = line.lstrip("#").strip()
    return heading


def run_block(block: Block, cwd: Path, python: str = sys.executable,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """`block` as a script of its own, run by `python` in `cwd` (one thread, as the README's
    timings were measured)."""
    script = Path(cwd) / "readme_block.py"
    script.write_text(block.code, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("PYTHONPATH", None)  # the package under test, not a checkout on the path
    try:
        return subprocess.run([python, script.name], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, env=env)
    finally:
        script.unlink()
