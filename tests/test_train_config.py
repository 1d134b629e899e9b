"""The training configuration as a user gives it: recipes, `--config` under flags under `--set`,
invalid values named by field, renamed fields still read. Every rule of hiposeg/config.py has its
own case in tests/test_reliability_configs.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import fails_with, squash
from faults import train_args
from hiposeg.cli import app
from hiposeg.config import build_config, load_config_file, parse_set


@pytest.mark.parametrize("dataset,crop,batch,iters", [
    ("cityscapes", (512, 1024), 8, 80_000), ("mapillary", (512, 1024), 8, 80_000),
    ("ade20k", (512, 512), 16, 60_000), ("pascal-part", (512, 512), 16, 60_000),
])
def test_dataset_recipes_are_the_papers(dataset, crop, batch, iters):
    """Paper Sec. 4.1: DeepLabV3+ R-101 at output stride 8, SGD lr 0.01, momentum 0.9, wd 1e-4, poly 0.9."""
    cfg = build_config({"data": {"dataset": dataset}})
    assert (cfg.data.crop, cfg.optim.batch_size, cfg.optim.iters) == (crop, batch, iters)
    assert (cfg.model.backbone, cfg.model.output_stride) == ("resnet101", 8)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.poly_power) == (0.01, 0.9, 1e-4, 0.9)
    assert cfg.loss.schedule == "sequential" and cfg.loss.terms == ["ce", "fh", "hh", "fl", "ll", "align"]
    assert cfg.resolved_out() == Path("runs") / f"{dataset}-resnet101"


def test_config_file_layers_under_flags_and_set(cli, tiny_data, tmp_path):
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("optim:\n  iters: 3\n  lr: 0.005\nloss:\n  tau: 0.2\n  terms: [ce, fh, hh]\n")
    out = tmp_path / "cfgrun"
    args = [a for a in train_args(tiny_data, out, iters=6) if a not in ("--iters", "6")]
    r = cli.invoke(app, args + ["--config", str(cfg_file), "--set", "loss.tau=0.3"])
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["optim"]["iters"] == 3 and saved["optim"]["lr"] == 0.005   # from the file
    assert saved["loss"]["tau"] == 0.3                                       # --set beats the file
    assert saved["loss"]["terms"] == ["ce", "fh", "hh"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    fails_with(train_args(tiny_data, tmp_path / "b", "--config", bad, iters=6), "bad.yaml")


def test_missing_prepared_data_names_the_prepare_command(tmp_path):
    """The recipe name decides the command, whatever the folder is called."""
    fails_with(["train", "--dataset", "ade20k", "--data", tmp_path / "nope", "--quiet"],
               f"hiposeg prepare ade20k RAW --out {tmp_path / 'nope'}")
    fails_with(["train", "--data", tmp_path / "cityscapes", "--quiet"], "hiposeg prepare cityscapes RAW")  # by folder name


@pytest.mark.parametrize("setting,field", [
    ("loss.sigma1=2.0", "sigma1"),
    ("optim.lr=-1", "optim.lr"),
    ("loss.memory_momentum=1.5", "loss.memory_momentum"),
    ("loss.terms=ce,align", "align"),
    ("loss.terms=ce,xx", "xx"),
    ("model.backbone=vgg16", "model.backbone"),
    ("run.amp=fp8", "run.amp"),
    ("optim.itres=10", "optim.itres"),
])
def test_invalid_config_values_name_the_field(tiny_data, tmp_path, setting, field):
    fails_with(train_args(tiny_data, tmp_path / "x", "--set", setting, iters=6), "invalid training configuration",
               f"{field}")


NOTE = ("names loss.momentum, which is now loss.memory_momentum (the momentum m of the prototype memory, eq. 15; "
        "SGD's is optim.momentum)")


def test_loss_momentum_is_read_as_loss_memory_momentum_with_a_note(tmp_path, capsys):
    """The field's old name still works in a config file and in --set, saying where it was found;
    under both names at once it is refused."""
    old = tmp_path / "old.yaml"
    old.write_text("loss:\n  momentum: 0.8\n")
    cfg = build_config(load_config_file(old))
    assert cfg.loss.memory_momentum == 0.8
    assert squash(f"hiposeg: config file {old} {NOTE}") in squash(capsys.readouterr().err)
    assert build_config(parse_set(["loss.momentum=0.7"])).loss.memory_momentum == 0.7
    assert squash(f"hiposeg: --set {NOTE}") in squash(capsys.readouterr().err)
    # a later layer's new name beats an earlier layer's old one, as for any field
    assert build_config(load_config_file(old), parse_set(["loss.memory_momentum=0.6"])).loss.memory_momentum == 0.6
    both = tmp_path / "both.yaml"
    both.write_text("loss:\n  momentum: 0.8\n  memory_momentum: 0.7\n")
    fails_with(["train", "--config", both, "--quiet"],
               f"config file {both} gives both loss.momentum and loss.memory_momentum", "Keep only loss.memory_momentum")
