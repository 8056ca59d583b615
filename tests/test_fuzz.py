"""Runs the property-based fuzzing of fuzz_cases.py in a subprocess, so that a crash (a
segfault, an abort) fails this test instead of killing the suite."""

import os
import subprocess
import sys
from pathlib import Path

FUZZ = Path(__file__).with_name("fuzz_cases.py")
MIN_CASES = 10_000


def test_fuzzed_cases_end_in_a_result_or_a_clear_error():
    run = subprocess.run(
        [sys.executable, str(FUZZ)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    report = run.stdout + run.stderr
    assert run.returncode == 0, f"fuzzing failed (exit {run.returncode}):\n{report[-6000:]}"
    counts = {
        line.split()[1]: int(line.split()[2])
        for line in run.stdout.splitlines()
        if line.startswith("cases ")
    }
    print("fuzzed cases:", counts)
    assert len(counts) == 5 and sum(counts.values()) >= MIN_CASES, counts
