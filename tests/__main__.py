"""Run the whole suite, one pytest process per test file: `python -m tests [pytest options]`.

Why not one `python -m pytest` process: on a 2-core AMD EPYC (AVX2) machine the single process, after
about 800 tests had loaded ONNX Runtime, OpenVINO, NNCF and OpenMP thread pools into it, died with SIGSEGV
(SI_KERNEL, no Python traceback) at varying tests; every file alone passes. Until the cause is found, each
file gets a fresh process. Options after `python -m tests` go to every pytest run (e.g. `-m "not slow"`).
The last line is the total, 'N passed, N failed, N skipped'; the exit code is 1 when any file failed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

COUNTED = ("passed", "failed", "skipped", "errors", "error")
NO_TESTS_COLLECTED = 5  # pytest's exit code when a file's tests are all deselected


def run_file(path: Path, options: list[str]) -> tuple[int, dict[str, int]]:
    """(pytest's exit code, {outcome: count}) of one file, its output passed through."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path), *options],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(proc.stdout, end="", flush=True)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary) if word in COUNTED}
    return proc.returncode, counts


def main(options: list[str]) -> int:
    files = sorted(Path(__file__).resolve().parent.glob("test_*.py"))
    totals = dict.fromkeys(("passed", "failed", "skipped"), 0)
    broken = []
    for path in files:
        print(f"== {path.name}", flush=True)
        code, counts = run_file(path, options)
        totals["passed"] += counts.get("passed", 0)
        totals["skipped"] += counts.get("skipped", 0)
        totals["failed"] += counts.get("failed", 0) + counts.get("errors", 0) + counts.get("error", 0)
        if code not in (0, NO_TESTS_COLLECTED):
            broken.append(f"{path.name} (exit code {code})")
    if broken:
        print("files that failed: " + ", ".join(broken))
    print(f"{totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
