"""Reliability: every configuration and hierarchy rule fails with a message that names the field.

Configuration: one case per rule of hiposeg/config.py, given the way a user gives it (`hiposeg
train --set key=value`); `test_every_config_rule_has_a_case` reads the rules out of the Pydantic
models, so a rule added without a case here fails the suite. tests/test_train_config.py
(test_invalid_config_values_name_the_field) runs eight of them through the same path.

Hierarchy files: tests/test_hierarchy.py (`INVALID`, test_invalid_file_message) covers the
cross-reference rules and most schema rules; the rules it leaves out are here, through
`hiposeg hierarchy validate`.
"""

from __future__ import annotations

import copy
import json
import resource
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
from annotated_types import Ge, Gt, Le, Lt

from conftest import fails_with, squash
from hiposeg.cli import app
from hiposeg.config import DataConfig, LossConfig, ModelConfig, OptimConfig, RunConfig

SECTIONS = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "optim": OptimConfig, "run": RunConfig}


def train_fails(tmp_path: Path, *args: str) -> str:
    return fails_with(["train", "--data", tmp_path / "nowhere", "--out", tmp_path / "run", "--quiet", *args])


# (field, rule) -> (--set value, words the message must hold besides the field's dotted name)
CONFIG_RULES: dict[tuple[str, str], tuple[str, str]] = {
    ("data.crop", "_crop_positive"): ("[8,64]", "crop 8x64 is too small; use at least 16x16"),
    ("data.scale_range", "_scale_ok"): ("[2.0,1.0]", "must satisfy 0 < min <= max"),
    ("data.color_jitter", "ge"): ("-0.1", "greater than or equal to 0"),
    ("data.color_jitter", "le"): ("1.5", "less than or equal to 1"),
    ("data.workers", "ge"): ("-1", "greater than or equal to 0"),
    ("data.std", "_std_positive"): ("[0.2,0,0.2]", "std values must be > 0"),
    ("model.name", "_known_family"): ("maskformer", "'maskformer' is not a model family; choose one of deeplabv3plus, "
                                                    "hrnet, segformer, fpn, unet"),
    ("model.backbone", "_variant_of_family"): ("vgg16", "'vgg16' is not a deeplabv3plus variant; choose one of "
                                                        "resnet18, resnet50, resnet101"),
    ("model.output_stride", "literal"): ("32", "8 or 16"),
    ("model.embed_dim", "ge"): ("4", "greater than or equal to 8"),
    ("model.embed_source", "literal"): ("stage3", "'decoder' or 'backbone'"),
    ("model.decoder_channels", "ge"): ("4", "greater than or equal to 8"),
    ("model.aux_weight", "ge"): ("-0.4", "greater than or equal to 0"),
    ("loss.terms", "_valid_terms"): ("ce,xx", "unknown loss term(s) ['xx']"),
    ("loss.terms", "_valid_terms:align"): ("ce,fh,align", "'align' couples the two levels"),
    ("loss.schedule", "literal"): ("random", "'sequential' or 'joint'"),
    ("loss.tau", "gt"): ("0", "greater than 0"),
    ("loss.kappa", "gt"): ("-1", "greater than 0"),
    ("loss.lambda_ce", "ge"): ("-1", "greater than or equal to 0"),
    ("loss.lambda_fh", "ge"): ("-1", "greater than or equal to 0"),
    ("loss.lambda_hh", "ge"): ("-1", "greater than or equal to 0"),
    ("loss.lambda_fl", "ge"): ("-1", "greater than or equal to 0"),
    ("loss.lambda_ll", "ge"): ("-1", "greater than or equal to 0"),
    ("loss.lambda_align", "ge"): ("-1", "greater than or equal to 0"),
    ("loss.alpha", "gt"): ("0", "greater than 0"),
    ("loss.beta", "gt"): ("0", "greater than 0"),
    ("loss.sigma1", "gt"): ("0", "greater than 0"),
    ("loss.sigma2", "gt"): ("0", "greater than 0"),
    ("loss.memory_momentum", "gt"): ("0", "greater than 0"),
    ("loss.memory_momentum", "lt"): ("1", "less than 1"),
    ("loss.sigma1", "_margins"): ("1.5", "need 0 < sigma1 < sigma2 (paper eq. 13); got sigma1=1.5, sigma2=1.0"),
    ("loss.phases", "_margins"): ("[0.5,0.2,0.3]", "phases (0.5, 0.2, 0.3) must be non-decreasing fractions"),
    ("optim.lr", "gt"): ("0", "greater than 0"),
    ("optim.momentum", "ge"): ("-0.5", "greater than or equal to 0"),
    ("optim.momentum", "lt"): ("1", "less than 1"),
    ("optim.weight_decay", "ge"): ("-1e-4", "greater than or equal to 0"),
    ("optim.poly_power", "ge"): ("-1", "greater than or equal to 0"),
    ("optim.iters", "ge"): ("0", "greater than or equal to 1"),
    ("optim.batch_size", "ge"): ("0", "greater than or equal to 1"),
    ("optim.warmup_iters", "ge"): ("-1", "greater than or equal to 0"),
    ("run.gpus", "ge"): ("0", "greater than or equal to 1"),
    ("run.device", "literal"): ("tpu", "'auto', 'cuda' or 'cpu'"),
    ("run.launcher", "literal"): ("slurm", "'single', 'spawn' or 'torchrun'"),
    ("run.amp", "literal"): ("fp8", "'off', 'fp16' or 'bf16'"),
    ("run.ckpt_every", "ge"): ("0", "greater than or equal to 1"),
    ("run.eval_every", "ge"): ("-1", "greater than or equal to 0"),
    ("run.log_every", "ge"): ("0", "greater than or equal to 1"),
    ("run.eval_mode", "literal"): ("fast", "'auto', 'whole' or 'slide'"),
    ("run.eval_batch_size", "ge"): ("0", "greater than or equal to 1"),
}
BOUNDS = {Ge: "ge", Gt: "gt", Le: "le", Lt: "lt"}


def declared_rules() -> set[tuple[str, str]]:
    """Every rule the config models declare: bounds, choices, field and model validators."""
    rules = set()
    for section, model in SECTIONS.items():
        for name, info in model.model_fields.items():
            for m in info.metadata:
                rules |= {(f"{section}.{name}", BOUNDS[t]) for t in BOUNDS if isinstance(m, t)}
            if typing.get_origin(info.annotation) is typing.Literal:
                rules.add((f"{section}.{name}", "literal"))
        decorators = model.__pydantic_decorators__
        for vname, v in decorators.field_validators.items():
            if v.info.mode == "after":  # "before" validators only reshape the input
                rules |= {(f"{section}.{f}", vname) for f in v.info.fields}
        rules |= {(section, vname) for vname in decorators.model_validators}
    return rules


def test_every_config_rule_has_a_case():
    covered = {(f, r.split(":")[0]) for f, r in CONFIG_RULES} | {(f.split(".")[0], r) for f, r in CONFIG_RULES}
    missing = declared_rules() - covered
    assert not missing, f"config rules without a test case in CONFIG_RULES: {sorted(missing)}"


@pytest.mark.parametrize("field, rule", list(CONFIG_RULES), ids=[f"{f}:{r}" for f, r in CONFIG_RULES])
def test_config_rule_message_names_the_field(tmp_path, field, rule):
    value, words = CONFIG_RULES[(field, rule)]
    out = train_fails(tmp_path, "--set", f"{field}={value}")
    section, name = field.split(".")
    located = f"- {field}:" if rule != "_margins" else f"- {section}:"  # model rules sit on the section
    assert squash(located) in squash(out), out
    assert squash(words) in squash(out), (words, out)
    assert name in out and "invalid training configuration" in out
    assert squash("Fix the named field (flag, --set key=value, or --config file)") in squash(out)


@pytest.mark.parametrize("args, words", [
    (["--crop", "64by64"], ["--crop '64by64' is not of the form HxW", "Example: --crop 512x1024"]),
    (["--set", "optim.iters"], ["--set 'optim.iters' is not of the form key=value"]),
    (["--set", "=3"], ["--set '=3' has an empty key"]),
    (["--set", "optim=3", "--set", "optim.lr=0.1"], ["conflicts with another --set for 'optim'"]),
    (["--set", "optim.iters=many"], ["- optim.iters:", "valid integer", "(got 'many')"]),
    (["--set", "optim.learning_rate=0.1"], ["- optim.learning_rate: unknown field"]),
    (["--set", "trainer.iters=5"], ["- trainer: unknown field"]),
    (["--set", "data.crop=[64]"], ["- data.crop.1: Field required (got [64])"]),
])
def test_cli_config_syntax_errors_name_the_flag(tmp_path, args, words):
    out = train_fails(tmp_path, *args)
    for w in words:
        assert squash(w) in squash(out), (w, out)


@pytest.mark.parametrize("name, text, words", [
    ("list.yaml", "- optim\n- iters\n", ["must hold a mapping (sections data, model, loss, optim, run)"]),
    ("broken.json", '{"optim": {"iters": 3,}}', ["is not valid JSON"]),
    ("typo.yaml", "optim:\n  itres: 3\n", ["- optim.itres: unknown field"]),  # names the field, not the file
    ("missing.yaml", None, ["cannot read config file", "No such file or directory"]),
])
def test_config_file_errors_name_the_file(tmp_path, name, text, words):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    out = train_fails(tmp_path, "--config", str(path))
    for w in words if name == "typo.yaml" else [name, *words]:
        assert squash(w) in squash(out), (w, out)


def alias_bomb(levels: int, use: str) -> str:
    """YAML whose last anchor expands to 9**levels values through aliases (a few hundred bytes)."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join([*lines, use.format(last=f"*a{levels - 1}")]) + "\n"


def test_deeply_nested_config_values_are_refused_naming_the_source(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text('{"optim": ' + "[" * 100_000 + "]" * 100_000 + "}")
    out = train_fails(tmp_path, "--config", str(deep))
    assert squash(f"config file {deep} nests its values too deeply") in squash(out), out
    out = train_fails(tmp_path, "--set", "optim.iters=" + "[" * 100_000 + "]" * 100_000)
    assert "--set optim.iters nests its values" in out, out


def test_a_yaml_alias_bomb_in_a_config_file_is_refused_at_once(tmp_path):
    """`python -m hiposeg` in a child process (it hung, formatting the validation message), with a time
    and memory limit."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb(9, "optim: {last}"))

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "hiposeg", "train", "--config", str(bomb), "--quiet"],
                              capture_output=True, text=True, timeout=60, preexec_fn=limits)
    except subprocess.TimeoutExpired:
        pytest.fail("hiposeg train --config with a YAML alias bomb did not finish in 60 s")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert squash(f"config file {bomb} expands to more than 1,000,000 values through YAML aliases") in \
        squash(proc.stderr), proc.stderr
    assert time.monotonic() - t0 < 30


def test_a_large_aliased_value_gives_a_short_message(tmp_path):
    """Under the expansion bound, a wrong value still must not be printed in full (59,049 items here)."""
    big = tmp_path / "big.yaml"
    big.write_text(alias_bomb(5, "optim: {{iters: {last}}}"))
    out = train_fails(tmp_path, "--config", str(big))
    assert "- optim.iters: Input should be a valid integer" in out and "..." in out, out
    assert len(out) < 3000


# ------------------------------------------------------------------------------------------
# Hierarchy rules tests/test_hierarchy.py does not exercise
# ------------------------------------------------------------------------------------------


def toy() -> dict:
    """Valid: a, b -> X; c -> Y; raw 1, 2, 3; raw 0 ignored."""
    return {
        "name": "toy", "source": "test",
        "levels": [
            {"name": "leaf", "classes": [
                {"id": 0, "name": "a", "color": [10, 0, 0], "parent": "X", "raw": [1]},
                {"id": 1, "name": "b", "color": [20, 0, 0], "parent": "X", "raw": [2]},
                {"id": 2, "name": "c", "color": [30, 0, 0], "parent": "Y", "raw": [3]}]},
            {"name": "top", "classes": [{"id": 0, "name": "X", "color": [0, 10, 0]},
                                        {"id": 1, "name": "Y", "color": [0, 20, 0]}]},
        ],
        "raw": {"ignore": [0]},
    }


def without_raw(d: dict) -> None:
    for c in d["levels"][0]["classes"]:
        del c["raw"]


HIERARCHY_RULES = {
    "negative class id": (lambda d: d["levels"][0]["classes"][0].update(id=-1),
                          ["levels[0].classes[0].id (class 'a')", "greater than or equal to 0"]),
    "empty class name": (lambda d: d["levels"][0]["classes"][1].update(name=""),
                         ["levels[0].classes[1].name", "at least 1 character"]),
    "empty level name": (lambda d: d["levels"][1].update(name=""), ["levels[1].name", "at least 1 character"]),
    "level without classes": (lambda d: d["levels"][1].update(classes=[]), ["levels[1].classes", "at least 1 item"]),
    "raw value above 16 bits": (lambda d: d["levels"][0]["classes"][2].update(raw=[70000]),
                                ["levels[0].classes[2].raw (class 'c')", "raw value 70000 is outside 0..65535"]),
    "ignore value above 16 bits": (lambda d: d["raw"].update(ignore=[70000]),
                                   ["raw.ignore", "raw ignore value 70000 is outside 0..65535"]),
    "name with spaces": (lambda d: d.update(name="my toy"), ["- name:", "should match pattern"]),
    "no source": (lambda d: d.pop("source"), ["- source:", "Field required"]),
    "colour with two components": (lambda d: d["levels"][0]["classes"][0].update(color=[1, 2]),
                                   ["levels[0].classes[0].color[2] (class 'a'): Field required"]),
    "ignore value that is a leaf id": (lambda d: (without_raw(d), d["raw"].update(ignore=[1])),
                                       ["raw.ignore: values [1] are also leaf ids"]),
    "unknown fine training level": (lambda d: d.update(train={"fine": "part", "coarse": "top"}),
                                    ["train.fine: unknown level 'part'"]),
    "unknown field in train": (lambda d: d.update(train={"fine": "leaf", "coarse": "top", "extra": 1}),
                               ["train.extra", "unknown field"]),
    "unknown field in raw": (lambda d: d["raw"].update(unknown=[5]), ["raw.unknown", "unknown field"]),
}


@pytest.mark.parametrize("kind", list(HIERARCHY_RULES))
def test_hierarchy_rule_message_names_the_field(cli, tmp_path, kind):
    mutate, words = HIERARCHY_RULES[kind]
    spec = copy.deepcopy(toy())
    mutate(spec)
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(spec))
    r = cli.invoke(app, ["hierarchy", "validate", str(path)])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    for w in [f"invalid hierarchy {path}", *words, "hiposeg hierarchy validate FILE"]:
        assert squash(w) in squash(r.output), (w, r.output)


def test_the_toy_hierarchy_itself_is_valid(cli, tmp_path):
    (tmp_path / "toy.json").write_text(json.dumps(toy()))
    r = cli.invoke(app, ["hierarchy", "validate", str(tmp_path / "toy.json")])
    assert r.exit_code == 0, r.output


# ---- rules checked when a run starts (devices, run directory, data) ---------------------------


def run_fails(data: Path, out: Path, *args: str) -> str:
    out = fails_with(["train", "--data", data, "--out", out, "--iters", "2", "--batch-size", "2", "--crop", "64x64",
                      "--backbone", "resnet18", "--output-stride", "16", "--workers", "0", "--quiet", *args])
    return " ".join(out.split())


def test_fp16_on_the_cpu_names_the_flag_and_the_alternative(tiny_data, tmp_path):
    text = run_fails(tiny_data, tmp_path / "run", "--device", "cpu", "--amp", "fp16")
    assert "--amp fp16 needs a CUDA GPU" in text and "--amp bf16" in text


def test_gpu_requests_without_gpus_name_the_flag_and_the_fix(tiny_data, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    text = run_fails(tiny_data, tmp_path / "a", "--device", "cuda")
    assert "--device cuda was requested but PyTorch sees no CUDA GPU" in text and "--device cpu" in text
    text = run_fails(tiny_data, tmp_path / "b", "--gpus", "2")
    assert "--gpus 2 needs 2 GPUs, but PyTorch sees none" in text and "--device cpu" in text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    text = run_fails(tiny_data, tmp_path / "c", "--gpus", "4")
    assert "--gpus 4 needs 4 GPUs, but PyTorch sees 1" in text and "--gpus 1" in text


def test_an_empty_training_split_is_named(tiny_data, tmp_path):
    import shutil

    data = tmp_path / "emptied"
    shutil.copytree(tiny_data, data, symlinks=True)
    for f in (data / "train" / "fine").iterdir():
        f.unlink()
    text = run_fails(data, tmp_path / "run", "--device", "cpu")
    assert squash(f"{data / 'train' / 'fine'} holds no label maps") in squash(text) and "hiposeg prepare" in text


# ------------------------------------------------------------------------------------------
# Counts on the command line, and the environment of a torchrun launch
# ------------------------------------------------------------------------------------------

COMMANDS = {"train": ["train", "--out"], "ablate": ["ablate", "--out"], "eval": ["eval", "RUN", "--report"],
            "predict": ["predict", "M.pt", "IMG", "--out"]}  # each followed by its output path
COUNTS = [("train", "--iters", "0"), ("train", "--batch-size", "0"), ("train", "--workers", "-1"),
          ("train", "--gpus", "0"), ("train", "--ckpt-every", "0"), ("train", "--eval-every", "-1"),
          ("ablate", "--iters", "0"), ("ablate", "--batch-size", "0"), ("ablate", "--workers", "-1"),
          ("ablate", "--gpus", "0"), ("ablate", "--ckpt-every", "0"), ("ablate", "--eval-every", "-1"),
          ("ablate", "--seeds", "0"), ("eval", "--workers", "-1"), ("predict", "--batch-size", "0"),
          ("predict", "--workers", "-1")]


@pytest.mark.parametrize("command, flag, value", COUNTS, ids=[f"{c} {f} {v}" for c, f, v in COUNTS])
def test_every_count_option_refuses_a_value_below_its_minimum_by_name(tmp_path, command, flag, value):
    """Parsed with a lower bound (was: `eval --workers -1` a ValueError traceback from the DataLoader)."""
    fails_with([*COMMANDS[command], tmp_path / "out", flag, value], f"Invalid value for '{flag}'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("env, words", [
    ({}, "RANK=0, WORLD_SIZE=2, LOCAL_RANK=0 are set, as torchrun sets them, but MASTER_ADDR and MASTER_PORT are "
         "not: no torchrun group can be formed"),
    ({"RANK": "first"}, "RANK=first, WORLD_SIZE=2, LOCAL_RANK=0: these torchrun variables must be integers"),
    ({"RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     "RANK=2, WORLD_SIZE=2, LOCAL_RANK=0: RANK must lie in 0..WORLD_SIZE-1"),
    ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "http"}, "MASTER_PORT='http' (with RANK=0, WORLD_SIZE=2, "
                                                          "LOCAL_RANK=0) is not a port number"),
], ids=["no-master", "rank-text", "rank-outside", "port-text"])
def test_leftover_torchrun_variables_are_one_clear_error(tiny_data, tmp_path, monkeypatch, env, words):
    """RANK / WORLD_SIZE / LOCAL_RANK left in a shell (was: a ValueError traceback from torch's env://
    rendezvous, or from int())."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", **env}.items():
        monkeypatch.setenv(key, value)
    for key in {"MASTER_ADDR", "MASTER_PORT"} - set(env):
        monkeypatch.delenv(key, raising=False)
    fails_with(["train", "--data", tiny_data, "--out", tmp_path / "run", "--device", "cpu", "--quiet"], words,
               "unset RANK WORLD_SIZE LOCAL_RANK", "torchrun --nproc_per_node=N")
    assert not (tmp_path / "run").exists()


def test_a_torchrun_group_whose_other_ranks_never_come_is_a_clear_error_after_a_bounded_wait(tiny_data, tmp_path,
                                                                                              monkeypatch):
    """With MASTER_ADDR / MASTER_PORT set too, rank 0 waited for the missing rank until the 30-minute
    collective timeout (a hang); the rendezvous now has its own bound (shortened here), then names the
    variables, the address and the fix. `ablate`, which starts its own processes, names them at once."""
    import datetime

    import hiposeg.distributed as distributed

    port = distributed.free_port()
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed, "RENDEZVOUS_TIMEOUT", datetime.timedelta(seconds=2))
    started = time.monotonic()
    fails_with(["train", "--data", tiny_data, "--out", tmp_path / "run", "--device", "cpu", "--quiet"],
               "RANK=0, WORLD_SIZE=2, LOCAL_RANK=0 are set, but the 2 processes of that group did not meet at "
               f"127.0.0.1:{port} within 2 s", "unset RANK WORLD_SIZE LOCAL_RANK")
    assert time.monotonic() - started < 60 and not (tmp_path / "run").exists()
    fails_with(["ablate", "--data", tiny_data, "--out", tmp_path / "abl", "--device", "cpu", "--quiet"],
               "RANK=0, WORLD_SIZE=2, LOCAL_RANK=0 are set, as torchrun sets them, but `hiposeg ablate` starts its "
               "own processes per run", "unset RANK WORLD_SIZE LOCAL_RANK")
    assert not (tmp_path / "abl").exists()
