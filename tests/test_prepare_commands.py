"""The `hiposeg prepare` sub-commands come from the dataset sources (hiposeg/data/registry.py): a
source's docstring is its command's help, its `flags` the command's options, so a new converter is
its module (plus hierarchy file) and nothing in the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import typer

from conftest import squash
from hiposeg.cli import app
from hiposeg.cli.prepare import add_source_command
from hiposeg.data.options import COMMON_FLAGS, Flag
from hiposeg.data.registry import SOURCES
from hiposeg.data.sources import Discovery, Source, list_files, partner_in


def test_every_source_is_a_prepare_command_with_its_docstring_and_flags(cli):
    listing = cli.invoke(app, ["prepare", "--help"])
    assert listing.exit_code == 0, listing.output
    for name in [*SOURCES, "synthetic"]:
        assert f" {name} " in listing.output, (name, listing.output)
    for name, source in SOURCES.items():
        assert "__doc__" in vars(source), f"{source.__name__} has no docstring of its own (its command's help)"
        r = cli.invoke(app, ["prepare", name, "--help"])
        assert r.exit_code == 0, r.output
        assert squash(source.__doc__.splitlines()[0]) in squash(r.output), (name, r.output)
        for flag in source.flags:
            shown = flag.decls[0] if flag.decls else "--" + flag.name.replace("_", "-")
            assert shown in r.output, (name, shown, r.output)


class Tiles(Source):
    """Tiles: a layout made up for this test.

    RAW/img/*.png + RAW/lab/*.png, all in the split named by --split.
    """

    name = "tiles"
    default_hierarchy = "synthetic"
    flags = (*COMMON_FLAGS, Flag("split", str, "The split the files go to.", default="train", decls=("--split",)))

    def __init__(self, split: str = "train") -> None:
        self.split = split

    def options(self) -> dict[str, str]:
        return {"split": self.split}

    def discover(self, raw: Path) -> Discovery:
        found = Discovery(items={})
        found.add_split(self.split, list_files(raw / "img", [".png"]), list_files(raw / "lab", [".png"]),
                        partner_in(raw / "lab", ".png"), partner_in(raw / "img", ".png"))
        return found


def test_a_new_source_becomes_a_command_without_a_change_in_the_cli(tmp_path, cli):
    raw, out = tmp_path / "raw", tmp_path / "out"
    (raw / "img").mkdir(parents=True)
    (raw / "lab").mkdir()
    cv2.imwrite(str(raw / "img/t0.png"), np.zeros((8, 8, 3), np.uint8))
    labels = np.array([[0, 3, 6, 255]] * 8, np.uint8).repeat(2, axis=1)  # sky, house_roof, car_body, ignore
    cv2.imwrite(str(raw / "lab/t0.png"), labels)
    group = typer.Typer()
    group.callback()(lambda: None)  # a group, so the command is called by its name
    add_source_command(Tiles, group)
    r = cli.invoke(group, ["tiles", "--help"])
    assert r.exit_code == 0 and "Tiles: a layout made up for this test." in r.output and "--split" in r.output
    r = cli.invoke(group, ["tiles", str(raw), "--out", str(out), "--split", "val", "--workers", "1", "-q"])
    assert r.exit_code == 0, r.output
    # synthetic.json: sky -> background (0), house_roof -> house (1), car_body -> car (2)
    fine = cv2.imread(str(out / "val/fine/t0.png"), cv2.IMREAD_UNCHANGED)
    coarse = cv2.imread(str(out / "val/coarse/t0.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(fine, labels)
    np.testing.assert_array_equal(coarse, np.array([[0, 1, 2, 255]] * 8, np.uint8).repeat(2, axis=1))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "tiles" and manifest["options"]["split"] == "val"
    assert manifest["splits"]["val"]["images"] == 1
