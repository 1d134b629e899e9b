"""Reliability: user text printed through Rich is printed as written.

Class names, level names, paths and configuration names may hold `[...]`; Rich would read them as
markup (`[/red]` raises MarkupError, `[bold]x[/]` vanishes into a style). Every such text is a
`rich.text.Text` or escaped, and report files are written before anything is printed.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from faults import make_tiny_data, one_thread, train_args  # noqa: F401
from hiposeg.cli import app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = {"sky": "[bold]x[/]", "ground": "[/red]"}
LEVELS = {"part": "[bold]parts[/]", "object": "[/red] objects"}


def squash(text: str) -> str:
    return "".join(text.split())


@pytest.fixture(scope="module")
def marked(tmp_path_factory) -> Path:
    """The tiny set with class and level names that are Rich markup."""
    from hiposeg.hierarchy import Hierarchy

    root = make_tiny_data(tmp_path_factory.mktemp("markup") / "data")
    h = json.loads((root / "hierarchy.json").read_text())
    for level in h["levels"]:
        level["name"] = LEVELS[level["name"]]
        for c in level["classes"]:
            c["name"] = NAMES.get(c["name"], c["name"])
    h["train"] = {"fine": LEVELS["part"], "coarse": LEVELS["object"]}
    (root / "hierarchy.json").write_text(json.dumps(h))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["hierarchy"]["sha256"] = Hierarchy.from_file(root / "hierarchy.json").sha256
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_markup_in_class_and_level_names_and_paths_is_printed_as_written(marked, tmp_path):
    out = tmp_path / "[/red]run"
    args = [a for a in train_args(marked, out, iters=2) if a != "--quiet"]  # the logger prints the evaluation
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    text = squash(r.output)
    for needle in ("[bold]x[/]", "[/red]", "fine ([bold]parts[/]) mIoU", "coarse ([/red] objects) mIoU",
                   f"-> {out}", f"run directory: {out}"):
        assert squash(needle) in text, (needle, r.output)
    assert "[bold]x[/]" in json.loads((out / "report.json").read_text())["levels"]["fine"]["IoU"]
    report = tmp_path / "[bold]r[/].json"
    r = runner.invoke(app, ["eval", str(out), "--device", "cpu", "--workers", "0", "--mode", "whole",
                            "--report", str(report)])
    assert r.exit_code == 0, r.output
    assert squash("IoU per class — fine ([bold]parts[/])") in squash(r.output), r.output
    assert squash(f"report written to {report}") in squash(r.output)
    assert json.loads(report.read_text())["levels"]["coarse"]["level"] == "[/red] objects"
    # a user mistake naming such a path: the message as written, no MarkupError
    r = runner.invoke(app, train_args(tmp_path / "[/red]nowhere", tmp_path / "x", iters=2))
    assert r.exit_code == 2 and squash(f"no prepared dataset at {tmp_path / '[/red]nowhere'}") in squash(r.output)


def test_ablation_tables_print_configuration_names_as_written():
    from hiposeg.ablate.results import notes, results_markdown, results_table

    stat = {"mean": 50.0, "std": None, "n": 1}
    row = {"config": "losses=ce, data.root=[/red]", "values": {}, "finished": 1, "diverged": 0, "total": 1,
           "fine": stat, "coarse": stat, "delta_vs_ce": {"fine": None, "coarse": None}, "paper": None}
    results = {"hierarchy": "[bold]h[/]", "configs": [row], "notes": notes([row])}
    buf = io.StringIO()
    Console(file=buf, width=200).print(results_table(results))
    assert "data.root=[/red]" in buf.getvalue() and "Ablation on [bold]h[/]" in buf.getvalue()
    assert "data.root=[/red]" in results_markdown(results)
