"""The real-format sample files have one location setting (HIPOSEG_REAL_FIXTURES, read in conftest.py)
that every test using them follows: pointed at a folder without them, each such test is skipped with a
message naming the setting (none passes on files found elsewhere, none fails)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from conftest import REAL_FIXTURES_VARIABLE

TESTS = Path(__file__).resolve().parent


def real_sample_users() -> list[str]:
    """node ids of the test functions that call `real_sample`, found in the source of every module."""
    found = []
    for module in sorted(TESTS.glob("test_*.py")):
        for node in ast.parse(module.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and any(
                    isinstance(n, ast.Call) and getattr(n.func, "id", None) == "real_sample" for n in ast.walk(node)):
                found.append(f"{module.relative_to(TESTS.parent)}::{node.name}")
    return found


def test_every_test_of_the_real_samples_follows_the_one_setting(tmp_path):
    users = real_sample_users()
    assert len(users) == 6, users  # cityscapes, ade20k (2), mapillary v2.0 (2), v1.2 (README says "six")
    empty = tmp_path / "no-samples-here"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *users],
                          cwd=TESTS.parent, capture_output=True, text=True, timeout=600,
                          env={**os.environ, REAL_FIXTURES_VARIABLE: str(empty)})
    assert f"{len(users)} skipped" in proc.stdout, proc.stdout[-3000:]
    reasons = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert reasons and all(f"set {REAL_FIXTURES_VARIABLE}" in line for line in reasons), proc.stdout[-3000:]


def test_no_test_module_names_the_samples_location_itself():
    spellings = ("/".join(("fixtures", "real")), " / ".join(('"fixtures"', '"real"')))
    for module in sorted(TESTS.glob("*.py")):
        if module.name != "conftest.py":
            assert not any(s in module.read_text() for s in spellings), module
