"""Every time the README quotes was measured: it stands in BENCHMARKS.md's "Times the README quotes"
table beside the command that measured it, and the quickstart's measuring script reports wall time,
CPU time and peak memory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DURATION = re.compile(r"\b\d+(?:\.\d+)?\s?(?:min|minutes|s|sec|seconds|h|hours?)\b")
VAGUE = re.compile(r"\b(?:a few|several|some) (?:seconds|minutes|hours)\b|\bunder an hour\b|\bin seconds\b", re.I)
SECTION = "## Times the README quotes"


def quoted_times_table() -> list[str]:
    """The rows of BENCHMARKS.md's table of the README's times."""
    text = (REPO / "BENCHMARKS.md").read_text()
    assert SECTION in text, f"BENCHMARKS.md has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| README")]


def test_every_time_the_readme_quotes_is_measured_by_a_command_in_benchmarks():
    readme = (REPO / "README.md").read_text()
    assert not VAGUE.findall(readme), VAGUE.findall(readme)  # a time is a measured number, not "a few seconds"
    rows = quoted_times_table()
    quoted = DURATION.findall(readme)
    assert quoted, "the README quotes no time at all"
    for duration in quoted:
        row = next((r for r in rows if duration in r.split("|")[1]), None)
        assert row is not None, f"README's {duration!r} is not in BENCHMARKS.md's {SECTION!r} table"
        command = row.split("|")[3]
        assert re.search(r"`(python benchmarks/\S+\.py|hiposeg \w+)[^`]*`", command), row


MEASURED = (r"\d+\.\d s wall \(\d+( min \d\d)? s\), \d+ s CPU, peak RSS \d+\.\d\d GiB; "
            r"load average \d+\.\d -> \d+\.\d on \d+ cores( \(busy machine: an upper bound\))?")


@pytest.mark.slow
def test_the_quickstart_benchmark_reports_wall_time_cpu_time_and_peak_memory_of_both_commands():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_quickstart.py"), "--smoke"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"hiposeg prepare synthetic --train 4 .*: " + MEASURED, lines[0]), lines[0]
    assert re.fullmatch(r"hiposeg train --iters 2 .*: " + MEASURED, lines[1]), lines[1]
    assert re.fullmatch(r"  iter 2/2 .*", lines[2]), lines[2]  # the run trained, and says so
    assert re.fullmatch(r"  eval @ 2: fine \(part\) mIoU \d+\.\d\d, coarse \(object\) mIoU \d+\.\d\d", lines[3])
    rss_gib = float(re.search(r"peak RSS (\S+) GiB", lines[1]).group(1))
    assert 0.1 < rss_gib < 8, lines[1]  # torch alone is over 100 MiB resident: the child's RSS, not the runner's
