"""The reliability and security suite as a report: one line per check, passed/failed and what it measured.

Runs tests/reliability (real processes for kills and signals, injected faults for disk-full and failures,
hypothesis for malformed data) and prints, for each of the 12 checks, whether every test behind it passed and
the figures those tests recorded (max weight difference after resume, seconds to exit after SIGTERM, inputs
fuzzed, ...). Exit status: 0 when every check passed.

Usage: python benchmarks/reliability.py            (about 2 minutes on 2 CPU cores)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = {
    1: ("hard kill + resume", "test_kill_resume.py::test_sigkill"),
    2: ("kill during save", "test_kill_resume.py::test_kill_during_a_save"),
    3: ("disk full during save", "test_disk_full.py"),
    4: ("SIGTERM / Ctrl-C", "test_kill_resume.py::test_sigterm"),
    5: ("hostile pickle", "test_hostile_files.py::test_pickle|test_hostile_files.py::test_a_bare|test_hostile_files.py::test_a_planted"),
    6: ("remote code", "test_hostile_files.py::test_remote"),
    7: ("malformed data fuzzing", "test_fuzz_data.py"),
    8: ("non-finite loss", "test_nonfinite.py"),
    9: ("over-truncation", "test_truncation.py"),
    10: ("padding correctness", "test_padding.py"),
    11: ("generation limits", "test_generation_limits.py"),
    12: ("output atomicity", "test_atomic_outputs.py"),
}


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report, junit = Path(tmp) / "report.jsonl", Path(tmp) / "junit.xml"
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "reliability"),
                               f"--junitxml={junit}"], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "LLMKIT_RELIABILITY_REPORT": str(report)})
        seconds = time.perf_counter() - start
        figures: dict[int, list[str]] = {}
        if report.exists():
            for line in report.read_text().splitlines():
                row = json.loads(line)
                figures.setdefault(row["check"], []).append(f"{row['name']}: {row['figure']}")
        cases = []
        if junit.exists():
            for case in ET.parse(junit).iter("testcase"):
                name = f"{Path(case.get('classname', '').replace('.', '/')).name}.py::{case.get('name')}"
                failed = any(child.tag in ("failure", "error") for child in case)
                skipped = any(child.tag == "skipped" for child in case)
                cases.append((name, failed, skipped))
    all_ok = done.returncode == 0
    for number, (title, pattern) in CHECKS.items():
        mine = [c for c in cases if any(c[0].startswith(p) for p in pattern.split("|"))]
        ok = bool(mine) and not any(failed for _, failed, _ in mine)
        ran = sum(1 for _, _, skipped in mine if not skipped)
        status = "passed" if ok else "FAILED"
        print(f"check {number:>2} {title:<24} {status}  tests={ran}  " + (" | ".join(figures.get(number, [])) or "-"))
        all_ok = all_ok and ok
    total = len(cases)
    failed = sum(1 for _, f, _ in cases if f)
    print(f"reliability suite: {total - failed}/{total} tests passed in {seconds:.0f} s")
    if not all_ok:
        print(done.stdout[-4000:], file=sys.stderr)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
