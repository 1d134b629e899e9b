"""Every time the README quotes was measured: it stands in BENCHMARKS.md's "Times the README quotes"
table beside the command that measured it, and the quickstart's measuring script reports wall time,
CPU time and peak memory. The peer benchmark runs at a tiny size and compares like with like:
hiposeg's DeepLabV3+ has exactly the parameters of segmentation_models_pytorch's DeepLabV3Plus (both
are the paper's separable model), and the HiPoSeg training model adds only its projection head."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
PROJECTION_HEAD = 256 * 256 + 2 * 256 + 256 * 256 + 256  # conv 256->256 (no bias), BN, conv 256->d'=256
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


@pytest.mark.skipif(importlib.util.find_spec("segmentation_models_pytorch") is None,
                    reason="segmentation_models_pytorch (the peer compared with) is not installed")
def test_the_peer_benchmark_runs_at_a_tiny_size(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their `common` module as siblings
    import bench_peers

    assert bench_peers.main(["--backbone", "resnet18", "--output-stride", "16", "--size", "32x32",
                             "--infer-size", "32x32", "--repeats", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    # table rows: model, parameters, median ms, min ms, x SMP (median), x SMP (min)
    params = {m[1]: int(m[2].replace(",", "")) for m in re.finditer(r"^(\S.*?) {2,}([\d,]+)(?: +[\d.]+){4}$", out, re.MULTILINE)}
    assert set(params) == {"hiposeg CE", "HiPoSeg", "SMP DeepLabV3Plus"}
    assert params["hiposeg CE"] == params["SMP DeepLabV3Plus"]
    assert params["HiPoSeg"] == params["hiposeg CE"] + PROJECTION_HEAD
    assert "torchvision deeplabv3" not in out  # torchvision builds it for ResNet-50/101 at output stride 8 only
    for goal in ("hiposeg CE training step / SMP", "hiposeg inference / SMP", "HiPoSeg training step / SMP"):
        assert goal in out
