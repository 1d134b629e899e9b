"""`hiposeg ablate`: the grid rules, the results tables, and reruns that skip, resume and extend."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest

from conftest import fails_with, squash
from faults import StopAfter, install_full_disk, temp_files
from hiposeg.ablate.plan import (TABLE5_ROWS, Record, build_grid, experiment_of, ignored_by_ce, load_records, make_plan,
                                 merge_grid, slugify, split_sets)
from hiposeg.ablate.results import collect_results, results_markdown
from hiposeg.cli import app
from hiposeg.errors import UserError


def ablate_args(data: Path, out: Path, *extra: str) -> list[str]:
    """Tiny runs as `conftest.tiny_config`: resnet18 at 64x64, a few iterations, every term on."""
    return ["ablate", "--data", str(data), "--out", str(out), "--iters", "3", "--batch-size", "2", "--crop", "64x64",
            "--backbone", "resnet18", "--output-stride", "16", "--workers", "0", "--device", "cpu", "--quiet",
            "--deterministic", "--set", "model.embed_dim=32", "--set", "run.eval_mode=whole", "--schedule", "joint",
            *extra]


# ------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------


def test_default_grid_is_table5_and_axes_combine_as_a_cartesian_product():
    rows = [v.values["loss.terms"] for v in build_grid(None, None, [])]
    assert rows == [["ce"], ["ce", "fh", "hh"], ["ce", "fl", "ll"], ["ce", "fh", "hh", "fl", "ll"],
                    ["ce", "fh", "hh", "fl", "ll", "align"]]
    _, sweeps = split_sets(["loss.sigma1=0.1,0.25"])
    grid = build_grid(["ce", "fh,hh", "ll,fl"], "sequential,joint", sweeps)
    assert grid[0].name == "losses=ce" and grid[0].values == {"loss.terms": ["ce"]}  # schedule and sigma1 cannot change it
    grid = grid[1:]
    assert len(grid) == 2 * 2 * 2
    assert [v.name for v in grid[:3]] == [
        "losses=ce+fh+hh, schedule=sequential, loss.sigma1=0.1",
        "losses=ce+fh+hh, schedule=sequential, loss.sigma1=0.25",
        "losses=ce+fh+hh, schedule=joint, loss.sigma1=0.1"]
    assert grid[-1].values == {"loss.terms": ["ce", "fl", "ll"], "loss.schedule": "joint", "loss.sigma1": 0.25}
    assert grid[-1].overrides() == {"loss": {"terms": ["ce", "fl", "ll"], "schedule": "joint", "sigma1": 0.25}}
    assert grid[-1].slug == "losses=ce+fl+ll__schedule=joint__loss.sigma1=0.25"


def test_losses_without_ce_get_the_ce_baseline_for_every_other_setting():
    _, sweeps = split_sets(["loss.sigma1=0.1,0.25"])
    grid = build_grid(["fh,hh"], "joint", sweeps)
    assert [v.name for v in grid] == [  # one CE run: the schedule and sigma1 cannot change it
        "losses=ce", "losses=ce+fh+hh, schedule=joint, loss.sigma1=0.1", "losses=ce+fh+hh, schedule=joint, loss.sigma1=0.25"]
    assert grid[0].values == {"loss.terms": ["ce"]}
    # axes that do change a CE run stay on its rows
    _, sweeps = split_sets(["loss.lambda_ce=0.5,1", "optim.lr=0.01,0.02"])
    assert [v.name for v in build_grid(["fh,hh"], None, sweeps)][:4] == [
        "losses=ce, loss.lambda_ce=0.5, optim.lr=0.01", "losses=ce, loss.lambda_ce=0.5, optim.lr=0.02",
        "losses=ce, loss.lambda_ce=1, optim.lr=0.01", "losses=ce, loss.lambda_ce=1, optim.lr=0.02"]
    # a `ce` set given anywhere (also as `ce,ce`) is the baseline: not added again, its place kept
    for given, rows in [(["ce", "fh,hh"], [["ce"], ["ce", "fh", "hh"]]),
                        (["fh,hh", "ce,ce"], [["ce", "fh", "hh"], ["ce"]])]:
        assert [v.values["loss.terms"] for v in build_grid(given, None, [])] == rows


def test_set_values_sweep_on_commas_except_inside_list_valued_fields():
    plain, axes = split_sets(["optim.lr=0.02", "loss.tau=0.05,0.1,0.2", "data.crop=48,48",
                              "loss.phases=[0,0,0],[0.1,0.2,0.3]"])
    assert plain == ["optim.lr=0.02", "data.crop=48,48"]  # a list-valued field keeps its commas, as in train
    assert [(a.field, a.values) for a in axes] == [("loss.tau", (0.05, 0.1, 0.2)),
                                                    ("loss.phases", ([0, 0, 0], [0.1, 0.2, 0.3]))]
    for bad, words in [("loss.terms=ce,fh", "--losses"), ("loss.schedule=joint", "--schedule"),
                       ("run.seed=1,2", "--seeds"), ("loss.tau=0.1,0.1", "twice"), ("loss.tau=0.1,", "empty"),
                       ("novalue", "key=value")]:
        with pytest.raises(UserError) as e:
            split_sets([bad])
        assert words in str(e.value), (bad, str(e.value))


@pytest.mark.parametrize("losses,words", [
    ("fh,xx", ["unknown loss term", "ce, fh, hh, fl, ll, align"]),
    ("fh,align", ["align", "fine term"]),
])
def test_bad_losses_give_a_clear_error(tiny_data, tmp_path, losses, words):
    fails_with(ablate_args(tiny_data, tmp_path / "a", "--losses", losses), *words)
    assert not (tmp_path / "a").exists()  # validated before anything is written


def test_invalid_sweep_value_fails_before_any_training(tiny_data, tmp_path):
    fails_with(ablate_args(tiny_data, tmp_path / "a", "--set", "loss.sigma1=0.1,2.0"), "sigma1")
    assert not (tmp_path / "a").exists()


def test_an_ablation_recorded_before_loss_momentum_was_renamed_keeps_its_configurations(tiny_data, tmp_path, capsys):
    """ablation.json identifies a configuration by its resolved experiment; one recorded under the
    old field name `loss.momentum` is the same experiment as today's `loss.memory_momentum`, so a
    rerun reuses its configurations instead of refusing the names as "different settings"."""
    out = tmp_path / "abl"
    plan = make_plan(None, {"data": {"root": str(tiny_data)}}, [], ["fh,hh"], "joint", 1, None, out)
    records, _, added = merge_grid([], list(zip(plan.variants, plan.configs)), plan.seeds)
    out.mkdir()
    saved = [{"name": r.name, "slug": r.slug, "values": r.values, "seeds": r.seeds,
              "experiment": {**r.experiment, "loss": {("momentum" if k == "memory_momentum" else k): v
                                                      for k, v in r.experiment["loss"].items()}}} for r in records]
    (out / "ablation.json").write_text(json.dumps({"format": "hiposeg-ablation/1", "configs": saved}))
    old = load_records(out)
    assert squash("names loss.momentum, which is now loss.memory_momentum") in squash(capsys.readouterr().err)
    merged, mine, added = merge_grid(old, list(zip(plan.variants, plan.configs)), plan.seeds)
    assert added == [] and [r.name for r in mine] == [r.name for r in records] and len(merged) == 2


def test_an_ablation_recorded_before_model_families_keeps_its_configurations(tiny_data, tmp_path):
    """Experiments recorded before `model.name` existed are DeepLabV3+ ones: a rerun reuses them."""
    out = tmp_path / "abl"
    plan = make_plan(None, {"data": {"root": str(tiny_data)}}, [], ["fh,hh"], "joint", 1, None, out)
    records, _, _ = merge_grid([], list(zip(plan.variants, plan.configs)), plan.seeds)
    out.mkdir()
    saved = [{"name": r.name, "slug": r.slug, "values": r.values, "seeds": r.seeds,
              "experiment": {**r.experiment, "model": {k: v for k, v in r.experiment["model"].items() if k != "name"}}}
             for r in records]
    (out / "ablation.json").write_text(json.dumps({"format": "hiposeg-ablation/1", "configs": saved}))
    merged, mine, added = merge_grid(load_records(out), list(zip(plan.variants, plan.configs)), plan.seeds)
    assert added == [] and [r.name for r in mine] == [r.name for r in records] and len(merged) == 2


def test_model_families_sweep_with_each_familys_variant(tiny_data, tmp_path):
    """--model a,b is an axis of the grid (Table 9: CE and all terms per family); each family takes its
    variant for the recipe (the smallest on the synthetic set) unless FAMILY:VARIANT names one; one
    --model value sets the model of every run."""
    flags = {"data": {"root": str(tiny_data), "dataset": "synthetic"}}
    plan = make_plan(None, flags, [], ["ce", "fh,hh,fl,ll,align"], None, 1, None, None,
                     models="deeplabv3plus,hrnet,segformer:mit_b1")
    assert [v.name for v in plan.variants] == [
        "losses=ce, model=deeplabv3plus", "losses=ce, model=hrnet", "losses=ce, model=segformer:mit_b1",
        "losses=ce+fh+hh+fl+ll+align, model=deeplabv3plus", "losses=ce+fh+hh+fl+ll+align, model=hrnet",
        "losses=ce+fh+hh+fl+ll+align, model=segformer:mit_b1"]
    assert [(c.model.name, c.model.backbone) for c in plan.configs[:3]] == [
        ("deeplabv3plus", "resnet18"), ("hrnet", "hrnet_w18_small"), ("segformer", "mit_b1")]
    assert plan.out == Path("runs") / "ablate-synthetic-models"
    one = make_plan(None, flags, [], ["ce"], None, 1, None, None, models="unet")
    assert [v.name for v in one.variants] == ["losses=ce"] and one.configs[0].model.name == "unet"
    assert one.out == Path("runs") / "ablate-synthetic-unet-resnet18"
    with pytest.raises(UserError, match="'maskformer' is not a model family") as e:
        make_plan(None, flags, [], None, None, 1, None, None, models="hrnet,maskformer")
    assert "deeplabv3plus, hrnet, segformer, fpn, unet" in e.value.hint
    with pytest.raises(UserError, match="(?s)configuration 'losses=ce, model=hrnet:mit_b0'.*'mit_b0' is not a hrnet"):
        make_plan(None, flags, [], None, None, 1, None, None, models="deeplabv3plus,hrnet:mit_b0")


def test_an_ablation_over_two_families_trains_and_tabulates_both(tiny_data, tmp_path, cli):
    out = tmp_path / "abl"
    args = ablate_args(tiny_data, out, "--losses", "ce", "--losses", "fh,hh,fl,ll,align", "--model",
                       "deeplabv3plus:resnet18,segformer:mit_b0")
    i = args.index("--backbone")
    r = cli.invoke(app, args[:i] + args[i + 2:])  # the variants come with --model
    assert r.exit_code == 0, r.output
    results = json.loads((out / "results.json").read_text())
    rows = {row["config"]: row for row in results["configs"]}
    dl, sf, full = "model=deeplabv3plus:resnet18", "model=segformer:mit_b0", "losses=ce+fh+hh+fl+ll+align, schedule=joint"
    assert set(rows) == {f"losses=ce, {dl}", f"losses=ce, {sf}", f"{full}, {dl}", f"{full}, {sf}"}
    assert all(row["finished"] == 1 and row["fine"]["mean"] is not None for row in rows.values())
    assert rows[f"{full}, {sf}"]["ce_reference"] == f"losses=ce, {sf}"
    cfg = (out / rows[f"losses=ce, {sf}"]["dir"] / "seed-0" / "config.yaml").read_text()
    assert "name: segformer" in cfg and "backbone: mit_b0" in cfg


# ------------------------------------------------------------------------------------------
# Results from run directories (hand-made reports: no training)
# ------------------------------------------------------------------------------------------


def fake_run(root: Path, rec: Record, seed: int, fine: float, coarse: float, hierarchy: str) -> None:
    d = rec.run_dir(root, seed)
    d.mkdir(parents=True)
    (d / "report.json").write_text(json.dumps({"levels": {"fine": {"mIoU": fine}, "coarse": {"mIoU": coarse}},
                                               "hierarchy": {"name": hierarchy}}))
    (d / "status.json").write_text(json.dumps({"state": "finished", "iteration": 10}))


def record(terms: list[str], schedule: str = "sequential") -> Record:
    name = "losses=" + "+".join(terms)
    exp = {"loss": {"terms": terms, "schedule": schedule, "sigma1": 0.25, "sigma2": 1.0, "memory_momentum": 0.9},
           "optim": {"iters": 10}}
    return Record(name, slugify(name), {"loss.terms": terms}, exp, [0, 1])


@pytest.mark.parametrize("hierarchy,expected", [
    ("cityscapes", {"ce": 73.55, "ce+fh+hh": 80.96, "ce+fl+ll": 81.04, "ce+fh+hh+fl+ll": 79.16,
                    "ce+fh+hh+fl+ll+align": 84.04}),
    ("ade20k", {"ce": 44.48, "ce+fh+hh": 46.87, "ce+fl+ll": 46.92, "ce+fh+hh+fl+ll": None,
                "ce+fh+hh+fl+ll+align": 48.99}),
    ("mapillary_v2", {"ce": 31.65, "ce+fh+hh": 38.85, "ce+fl+ll": 37.21, "ce+fh+hh+fl+ll": None,
                      "ce+fh+hh+fl+ll+align": 41.42}),
    ("pascal_part_108", {"ce": 46.90, "ce+fh+hh": 47.59, "ce+fl+ll": 47.02, "ce+fh+hh+fl+ll": None,
                         "ce+fh+hh+fl+ll+align": 49.33}),
    ("synthetic", {"ce": None, "ce+fh+hh": None, "ce+fl+ll": None, "ce+fh+hh+fl+ll": None,
                   "ce+fh+hh+fl+ll+align": None}),
])
def test_results_mean_std_delta_and_paper_columns(tmp_path, hierarchy, expected):
    recs = [record(list(r)) for r in TABLE5_ROWS]
    scores = {0: (60.0, 80.0), 1: (62.0, 81.0)}  # ce: fine 60 / 62, coarse 80 / 81
    for i, rec in enumerate(recs):
        for s, (f, c) in scores.items():
            fake_run(tmp_path, rec, s, f + i, c + 2 * i, hierarchy)
    res = collect_results(tmp_path, recs)
    rows = {r["config"].removeprefix("losses="): r for r in res["configs"]}
    ce = rows["ce"]
    assert ce["fine"]["mean"] == pytest.approx(61.0) and ce["fine"]["std"] == pytest.approx(math.sqrt(2.0))
    assert ce["coarse"]["mean"] == pytest.approx(80.5) and ce["coarse"]["std"] == pytest.approx(math.sqrt(0.5))
    assert rows["ce+fl+ll"]["delta_vs_ce"] == pytest.approx({"fine": 2.0, "coarse": 4.0})
    for key, value in expected.items():
        paper = rows[key]["paper"]
        assert (paper and paper["fine_mIoU"]) == value or (paper is None and value is None), key
    # a non-paper setting (joint schedule) is not matched with the paper's rows
    joint = record(["ce"], schedule="joint")
    joint.slug = "joint-ce"
    fake_run(tmp_path, joint, 0, 1.0, 1.0, hierarchy)
    joint.seeds = [0]
    assert collect_results(tmp_path, [joint])["configs"][0]["paper"] is None


@pytest.mark.parametrize("hierarchy,paper_column", [("cityscapes", True), ("synthetic", False)])
def test_the_footnote_explains_the_paper_column_only_when_it_is_shown(tmp_path, hierarchy, paper_column):
    from rich.console import Console

    from hiposeg.ablate.results import results_table

    recs = [record(list(r)) for r in TABLE5_ROWS]
    for rec in recs:
        fake_run(tmp_path, rec, 0, 50.0, 60.0, hierarchy)
        rec.seeds = [0]
    res = collect_results(tmp_path, recs)
    console = Console(width=200, record=True)
    console.print(results_table(res))
    assert ("Paper:" in res["notes"]) == paper_column
    for shown in (results_markdown(res), console.export_text()):  # the column and its explanation go together
        assert ("paperfinemIoU" in squash(shown)) == paper_column, shown
        assert ("Paper:" in shown) == paper_column, shown
        assert squash("Δ: difference of the means") in squash(shown)


def test_a_grid_whose_runs_would_be_refused_is_refused_before_the_ablation_directory_is_written(cli, tiny_data,
                                                                                               tmp_path):
    """Was: ablation.json recorded the bad batch first, so the same command with the fix was refused as
    a grid whose configuration had changed."""
    out = tmp_path / "abl"
    fails_with(ablate_args(tiny_data, out, "--losses", "ce", "--batch-size", "1"), "leaves 1 image per process")
    assert not out.exists()
    r = cli.invoke(app, ablate_args(tiny_data, out, "--losses", "ce"))
    assert r.exit_code == 0, r.output
    assert json.loads((out / "results.json").read_text())["configs"][0]["finished"] == 1


# The paper's Table 9 (fine mIoU without / with HiPoSeg), typed from the paper for this test.
TABLE9 = {"hrnet": {"cityscapes": (80.85, 81.39), "pascal_part_108": (43.77, 43.98), "ade20k": (38.59, 38.95),
                    "mapillary_v2": (30.17, 43.48)},
          "segformer": {"cityscapes": (80.11, 80.63), "pascal_part_108": (51.32, 51.59), "ade20k": (43.69, 44.29),
                        "mapillary_v2": (44.29, 45.04)},
          "deeplabv3plus": {"cityscapes": (73.55, 84.04), "pascal_part_108": (46.90, 49.33),
                            "ade20k": (44.48, 48.99), "mapillary_v2": (31.65, 41.42)}}


@pytest.mark.parametrize("hierarchy", ["cityscapes", "pascal_part_108", "ade20k", "mapillary_v2"])
def test_each_family_is_shown_beside_its_table9_row(tmp_path, hierarchy):
    """A sweep over families (--model) puts Table 9's numbers beside the CE and all-terms rows of the
    families it reports (DeepLabV3+ ResNet-101's are Tables 5/6's); no paper number for the others."""
    recs = []
    for family in ("deeplabv3plus", "hrnet", "segformer", "fpn"):
        for terms in (["ce"], ["ce", "fh", "hh"], list(TABLE5_ROWS[-1])):
            rec = record(terms)
            rec.name, rec.slug = f"{rec.name}, model={family}", f"{rec.slug}-{family}"
            rec.values = {**rec.values, "model": {"name": family}}
            rec.experiment = {**rec.experiment, "model": {"name": family, "backbone": "x"}}
            fake_run(tmp_path, rec, 0, 50.0, 70.0, hierarchy)
            fake_run(tmp_path, rec, 1, 50.0, 70.0, hierarchy)
            recs.append(rec)
    rows = {r["config"]: r for r in collect_results(tmp_path, recs)["configs"]}
    for family, table in (("deeplabv3plus", "Table 6"), ("hrnet", "Table 9"), ("segformer", "Table 9")):
        ce, full = TABLE9[family][hierarchy]
        table = "Table 5" if family == "deeplabv3plus" and hierarchy == "cityscapes" else table
        assert rows[f"losses=ce, model={family}"]["paper"] == {"table": table, "fine_mIoU": ce}
        assert rows[f"losses=ce+fh+hh+fl+ll+align, model={family}"]["paper"] == {"table": table, "fine_mIoU": full}
    assert rows["losses=ce+fh+hh, model=hrnet"]["paper"] is None  # Table 9 has no high-level-only row
    assert all(rows[f"{t}, model=fpn"]["paper"] is None for t in ("losses=ce", "losses=ce+fh+hh+fl+ll+align"))
    assert rows["losses=ce+fh+hh+fl+ll+align, model=hrnet"]["ce_reference"] == "losses=ce, model=hrnet"


def test_unfinished_runs_are_counted_but_not_averaged(tmp_path):
    rec = record(["ce"])
    rec.seeds = [0, 1, 2]
    fake_run(tmp_path, rec, 0, 50.0, 70.0, "synthetic")
    rec.run_dir(tmp_path, 1).mkdir(parents=True)  # seed 1 never finished
    rec.run_dir(tmp_path, 2).mkdir(parents=True)  # seed 2 diverged
    (rec.run_dir(tmp_path, 2) / "status.json").write_text(json.dumps({"state": "diverged", "error": "nan in fh"}))
    res = collect_results(tmp_path, [rec])
    row = res["configs"][0]
    assert row["fine"] == {"mean": 50.0, "std": None, "n": 1}
    assert (row["finished"], row["diverged"], row["total"]) == (1, 1, 3)
    assert [r["state"] for r in row["runs"]] == ["finished", "new", "diverged"]
    assert row["runs"][2]["error"] == "nan in fh"
    assert "| 1/3 (1 diverged) |" in results_markdown(res)


def fake_fit_writing(calls: list[str], scores: dict[str, tuple[float, float] | None]):
    """Stand-in for engine.fit that writes what the engine writes (no training): the (fine, coarse)
    mIoU of `scores` keyed by the joined loss terms, or a divergence where the score is None."""
    import hiposeg.engine as engine

    def fake_fit(cfg, resume=None):
        out = cfg.run.out
        out.mkdir(parents=True, exist_ok=True)
        calls.append(out.parent.name)
        score = scores["+".join(cfg.loss.terms)]
        if score is None:
            (out / "status.json").write_text(json.dumps({"state": "diverged", "error": "loss became non-finite"}))
            raise engine.TrainingDiverged("the loss became non-finite at iteration 2 (fh=nan)")
        levels = {"fine": {"mIoU": score[0]}, "coarse": {"mIoU": score[1]}}
        (out / "report.json").write_text(json.dumps({"levels": levels, "hierarchy": {"name": "synthetic"}}))
        (out / "status.json").write_text(json.dumps({"state": "finished", "iteration": 3}))
        return engine.FitResult(out, None, 3, False)

    return fake_fit


def test_a_diverged_run_is_reported_and_skipped_and_the_grid_goes_on(cli, tiny_data, tmp_path, monkeypatch):
    import hiposeg.engine as engine

    calls: list[str] = []
    scores = {"ce": (40.0, 60.0), "ce+fh+hh": None, "ce+fl+ll": (40.0, 60.0)}
    monkeypatch.setattr(engine, "fit", fake_fit_writing(calls, scores))
    args = ablate_args(tiny_data, tmp_path / "abl", "--losses", "fh,hh", "--losses", "fl,ll")
    args.remove("--quiet")
    r = cli.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "diverged" in r.output and calls == ["losses=ce", "losses=ce+fh+hh__schedule=joint",
                                                "losses=ce+fl+ll__schedule=joint"]
    rows = json.loads((tmp_path / "abl" / "results.json").read_text())["configs"]
    assert [(x["finished"], x["diverged"]) for x in rows] == [(1, 0), (0, 1), (1, 0)]
    r = cli.invoke(app, args)  # a rerun does not repeat the diverged run
    assert r.exit_code == 0 and len(calls) == 3 and "diverged earlier, skipped" in " ".join(r.output.split())


def test_a_full_disk_in_ablate_is_one_clear_error_that_never_hides_a_runs_own(cli, tiny_data, tmp_path, monkeypatch):
    """ablation.json or the results tables on a full disk: "could not write FILE: No space left on
    device" and how to continue, no traceback, no temp file. When a run itself failed, its error is the
    one shown; the tables that could not be written are only noted."""
    import hiposeg.engine as engine

    out = tmp_path / "abl"
    calls: list[str] = []
    monkeypatch.setattr(engine, "fit", fake_fit_writing(calls, {"ce": (40.0, 60.0), "ce+fh+hh": (45.0, 61.0)}))
    args = ablate_args(tiny_data, out, "--losses", "fh,hh")
    for pattern in ("ablation.json", "results.*"):
        with monkeypatch.context() as m:
            install_full_disk(m, pattern, 0)
            fails_with(args, f"could not write {out}/{pattern.replace('*', 'json')}: No space left on device",
                       "rerun the same command")
        assert not temp_files(out)
    assert calls == ["losses=ce", "losses=ce+fh+hh__schedule=joint"]  # the second attempt trained, then failed

    def failing_fit(cfg, resume=None):
        raise UserError("the run's own error", hint="its own fix")

    monkeypatch.setattr(engine, "fit", failing_fit)
    install_full_disk(monkeypatch, "results.*", 0)
    output = fails_with(ablate_args(tiny_data, tmp_path / "abl2", "--losses", "fh,hh"), "the run's own error",
                        "its own fix", "the results tables were not updated (could not write")
    assert "No space left on device" in output


def test_losses_without_ce_plan_and_train_the_ce_baseline_so_delta_is_filled(cli, tiny_data, tmp_path, monkeypatch):
    import hiposeg.engine as engine

    out = tmp_path / "abl"
    r = cli.invoke(app, ablate_args(tiny_data, out, "--losses", "fh,hh", "--dry-run"))
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # Rich wraps long cells, so the names are checked on the plan below
    assert "2 configuration(s) x 1 seed(s)" in text and "(2 new)" in text and text.count("train") == 2
    assert not out.exists()  # a dry run writes nothing
    plan = make_plan(None, {"data": {"root": str(tiny_data)}}, [], ["fh,hh"], "joint", 1, None, out)
    assert [v.name for v in plan.variants] == ["losses=ce", "losses=ce+fh+hh, schedule=joint"]
    ce, fh = (experiment_of(c) for c in plan.configs)
    assert ce["loss"].pop("terms") == ["ce"] and fh["loss"].pop("terms") == ["ce", "fh", "hh"]
    for exp in (ce, fh):  # otherwise equal settings, up to the loss fields a CE run ignores (schedule, ...)
        exp["loss"] = {k: v for k, v in exp["loss"].items() if not ignored_by_ce(f"loss.{k}")}
    assert ce == fh and ce["loss"] == {"lambda_ce": 1.0}

    calls: list[str] = []
    monkeypatch.setattr(engine, "fit", fake_fit_writing(calls, {"ce": (40.0, 60.0), "ce+fh+hh": (45.5, 63.0)}))
    r = cli.invoke(app, ablate_args(tiny_data, out, "--losses", "fh,hh"))
    assert r.exit_code == 0, r.output
    assert calls == ["losses=ce", "losses=ce+fh+hh__schedule=joint"]
    rows = json.loads((out / "results.json").read_text())["configs"]
    assert [x["config"] for x in rows] == ["losses=ce", "losses=ce+fh+hh, schedule=joint"]
    assert rows[1]["ce_reference"] == "losses=ce"
    assert rows[1]["delta_vs_ce"] == pytest.approx({"fine": 5.5, "coarse": 3.0})
    assert "| losses=ce+fh+hh, schedule=joint | 45.50 | 63.00 | +5.50 | +3.00 |" in (out / "results.md").read_text()


# ------------------------------------------------------------------------------------------
# End to end on the synthetic set
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ablate_writes_tables_resumes_interrupted_and_skips_finished(cli, tiny_data, tmp_path, monkeypatch):
    import hiposeg.engine as engine

    out = tmp_path / "abl"
    args = ablate_args(tiny_data, out, "--losses", "ce", "--losses", "fh,hh")
    real_fit = engine.fit
    calls = []

    def recording_fit(cfg, resume=None):
        calls.append((cfg.run.out.name, cfg.run.out.parent.name, resume))
        return real_fit(cfg, resume=resume)

    monkeypatch.setattr(engine, "fit", recording_fit)

    # 1. the first run is interrupted after 1 of 3 iterations: the ablation stops there
    original_stop = engine.StopSignal
    monkeypatch.setattr(engine, "StopSignal", lambda: StopAfter(1))
    r = cli.invoke(app, args)
    assert r.exit_code == 130, r.output
    first = out / "runs" / "losses=ce" / "seed-0"
    status = json.loads((first / "status.json").read_text())
    assert (status["state"], status["iteration"]) == ("interrupted", 1)
    assert (first / "checkpoints" / "last.pt").exists() and not (first / "report.json").exists()
    assert len(calls) == 1 and calls[0][2] is None
    monkeypatch.setattr(engine, "StopSignal", original_stop)

    # 2. rerun: the interrupted run resumes from its last.pt, the other one starts
    r = cli.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert calls[1] == ("seed-0", "losses=ce", first / "checkpoints" / "last.pt")
    assert calls[2] == ("seed-0", "losses=ce+fh+hh__schedule=joint", None)
    assert json.loads((first / "status.json").read_text())["iteration"] == 3

    # the tables hold what the runs' own reports say
    reports = {name: json.loads((out / "runs" / name / "seed-0" / "report.json").read_text())
               for name in ("losses=ce", "losses=ce+fh+hh__schedule=joint")}
    res = json.loads((out / "results.json").read_text())
    assert [c["config"] for c in res["configs"]] == ["losses=ce", "losses=ce+fh+hh, schedule=joint"]
    for c, rep in zip(res["configs"], reports.values()):
        assert c["fine"]["mean"] == pytest.approx(rep["levels"]["fine"]["mIoU"])
        assert c["coarse"]["mean"] == pytest.approx(rep["levels"]["coarse"]["mIoU"])
        assert (c["finished"], c["total"]) == (1, 1)
    ce_fine = reports["losses=ce"]["levels"]["fine"]["mIoU"]
    hh_fine = reports["losses=ce+fh+hh__schedule=joint"]["levels"]["fine"]["mIoU"]
    assert res["configs"][1]["delta_vs_ce"]["fine"] == pytest.approx(hh_fine - ce_fine)
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert [row["loss.terms"] for row in rows] == ["ce", "ce+fh+hh"]
    assert float(rows[1]["fine_mIoU_mean"]) == pytest.approx(hh_fine, abs=1e-4)
    md = (out / "results.md").read_text()
    assert "| config | fine mIoU | coarse mIoU | Δ fine | Δ coarse | runs |" in md
    assert f"| losses=ce+fh+hh, schedule=joint | {hh_fine:.2f} |" in md
    assert "mIoU per" not in r.output and "Ablation on synthetic" in r.output
    saved = json.loads((out / "ablation.json").read_text())
    assert [c["values"]["loss.terms"] for c in saved["configs"]] == [["ce"], ["ce", "fh", "hh"]]

    # 3. rerun: every run is finished, nothing trains and nothing is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    r = cli.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert len(calls) == 3
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()} == stamps
    assert json.loads((out / "results.json").read_text())["configs"] == res["configs"]

    # 4. a larger grid adds its new configuration; changed settings under a recorded name are refused
    r = cli.invoke(app, ablate_args(tiny_data, out, "--losses", "ce", "--losses", "fh,hh", "--losses", "fl,ll",
                                       "--dry-run"))
    assert r.exit_code == 0, r.output
    assert "(1 new)" in r.output and r.output.count("skip") == 2 and "train" in r.output
    r = cli.invoke(app, ablate_args(tiny_data, out, "--losses", "ce", "--iters", "4"))
    assert r.exit_code == 2 and "optim.iters: 3 -> 4" in " ".join(r.output.split()) and "Traceback" not in r.output


@pytest.mark.slow
def test_seeds_repeat_a_configuration_and_report_mean_and_std(cli, tiny_data, tmp_path):
    out = tmp_path / "seeds"
    r = cli.invoke(app, ablate_args(tiny_data, out, "--losses", "ce", "--seeds", "2", "--seed", "5"))
    assert r.exit_code == 0, r.output
    runs = out / "runs" / "losses=ce"
    assert sorted(p.name for p in runs.iterdir()) == ["seed-5", "seed-6"]
    fine = [json.loads((runs / s / "report.json").read_text())["levels"]["fine"]["mIoU"] for s in ("seed-5", "seed-6")]
    mean = (fine[0] + fine[1]) / 2
    std = math.sqrt(((fine[0] - mean) ** 2 + (fine[1] - mean) ** 2) / (2 - 1))
    row = json.loads((out / "results.json").read_text())["configs"][0]
    assert row["fine"]["mean"] == pytest.approx(mean) and row["fine"]["std"] == pytest.approx(std)
    assert [run["seed"] for run in row["runs"]] == [5, 6]
    import yaml

    assert yaml.safe_load((runs / "seed-6" / "config.yaml").read_text())["run"]["seed"] == 6
