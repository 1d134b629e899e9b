"""The GPU suite (`python -m benchmarks.gpu`): its CPU rehearsal runs every section within the CI
budget, a machine without CUDA gets one line and exit code 2, and a failing section is recorded
without stopping the others."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hiposeg.models import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"cuda-tests", "step", "train", "latency", "compile", "peers"}


def suite(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.slow
def test_dry_run_runs_every_section_on_the_cpu_within_the_ci_budget(tmp_path):
    cpu_before = child_cpu_seconds()
    done = suite("--dry-run", "--out", str(tmp_path))
    cpu = child_cpu_seconds() - cpu_before
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "gpu-suite.json").read_text())
    rows = report["rows"]
    assert {r["section"] for r in rows} == SECTIONS and set(report["seconds"]) == SECTIONS
    assert [r for r in rows if r["status"].startswith("failed")] == []
    measured = {r["section"] for r in rows if r["value"] is not None}
    assert measured == {"step", "train", "latency", "compile", "peers"}
    assert {r["item"].split()[0] for r in rows if r["section"] == "latency"} == set(FAMILIES)  # every family
    if not torch.cuda.is_available():
        tests = [r for r in rows if r["section"] == "cuda-tests"]
        assert len(tests) >= 9 and all(r["status"].startswith("skipped: needs") for r in tests), tests
    table = (tmp_path / "gpu-suite.md").read_text()
    assert "| section | item | value | goal | status |" in table and "dry run on the CPU" in table
    # one thread on tiny tensors: CPU time is the wall time of an unloaded CI machine
    assert cpu < 60, f"the dry run took {cpu:.0f} s of CPU time (CI budget 60 s)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_without_cuda_the_suite_says_so_in_one_line_and_exits_2(tmp_path):
    done = suite("--out", str(tmp_path / "results"))
    assert done.returncode == 2
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and "sees no CUDA GPU" in lines[0] and "--dry-run" in lines[0], lines
    assert not (tmp_path / "results").exists()


def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    from benchmarks import gpu

    def broken(sizes, tmp):
        raise ImportError("cannot import name 'make_checkpoint' from 'hiposeg.engine'")

    def fine(sizes, tmp):
        return [gpu.Row("fine", "a figure", value=1.5, unit="x")]

    monkeypatch.setattr(gpu, "SECTIONS", [("broken", broken), ("fine", fine)])
    rows = gpu.run_suite(gpu.DRY, tmp_path, dry_run=True, only=None)
    assert [(r.section, r.status) for r in rows] == [
        ("broken", "failed: ImportError: cannot import name 'make_checkpoint' from 'hiposeg.engine'"), ("fine", "ok")]
    saved = json.loads((tmp_path / "gpu-suite.json").read_text())
    assert [r["section"] for r in saved["rows"]] == ["broken", "fine"] and set(saved["seconds"]) == {"broken", "fine"}
    assert "| fine | a figure | 1.500 x |" in (tmp_path / "gpu-suite.md").read_text()
