"""Rerun the mutation audit of docs/mutations.md: each listed one-line bug must make its listed tests fail.

    .venv/bin/python tests/run_mutations.py [ROW ...]

Works on a temporary copy of the source (this checkout is never edited, so a running build or another session is
never disturbed). Exit status 1 if any mutant survives or a listed test fails unmutated.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "mutations.md"
COPY = ("atmoe", "app", "demo", "tests", "streamlit_app.py", "pyproject.toml", ".streamlit")
LINK = ("assets",)


@dataclass
class Mutant:
    row: int
    file: str
    original: str
    mutant: str
    tests: list[str]


def _code(cell: str) -> str:
    m = re.fullmatch(r"\s*`(.*)`\s*", cell)
    if not m:
        raise ValueError(f"expected one code span, got {cell!r}")
    return m.group(1).replace("\\|", "|")


def read_table(path: Path = TABLE) -> list[Mutant]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not re.match(r"\|\s*\d+\s*\|", line):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        row, file, original, mutant, tests = cells
        out.append(Mutant(int(row), file, _code(original), _code(mutant), [t.strip() for t in tests.split(",")]))
    return out


def _pytest(work: Path, tests: list[str]) -> tuple[int, str]:
    """Exit status and the first failure's summary line (what killed the mutant: an assertion, not a crash)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-rfE", "--tb=no", *tests]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "400"}
    out = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    why = next((line for line in out.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))), "")
    return out.returncode, why


def _copy(work: Path) -> None:
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, work / name)
    for name in LINK:
        if (ROOT / name).exists():
            (work / name).symlink_to(ROOT / name)
    where = subprocess.run([sys.executable, "-c", "import atmoe, app; print(atmoe.__file__, app.__file__)"],
                           cwd=work, capture_output=True, text=True, check=True).stdout
    if str(ROOT) in where:  # the copy must shadow an editable install of this checkout
        raise RuntimeError(f"the copy imports the checkout's source: {where}")


def main(rows: list[int]) -> int:
    mutants = [m for m in read_table() if not rows or m.row in rows]
    failed = False
    with tempfile.TemporaryDirectory(prefix="atmoe-mutations-") as tmp:
        work = Path(tmp)
        _copy(work)
        tests = list(dict.fromkeys(t for m in mutants for t in m.tests))
        rc, why = _pytest(work, tests)
        if rc != 0:
            print(f"the listed tests fail without any mutant, fix them first: {why}", flush=True)
            return 1
        for m in mutants:
            target = work / m.file
            source = target.read_text(encoding="utf-8")
            if source.count(m.original) != 1:
                print(f"{m.row:>3} {m.file}: `{m.original}` occurs {source.count(m.original)} times (expected once)")
                failed = True
                continue
            target.write_text(source.replace(m.original, m.mutant), encoding="utf-8")
            try:
                rc, why = _pytest(work, m.tests)
            finally:
                target.write_text(source, encoding="utf-8")
            verdict = "KILLED" if rc != 0 else "SURVIVED"
            failed |= rc == 0
            print(f"{m.row:>3} {verdict:<8} {m.file}: {m.mutant}\n      {why[:300]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]]))
