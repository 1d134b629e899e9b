"""Each picture of `hiposeg plot` is written, non-blank and of the expected layout (bars per class,
panels per quantity, points per sampled pixel, ...), also on the 150 classes of ADE20K."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from matplotlib.container import BarContainer  # noqa: E402

from hiposeg.hierarchy import Hierarchy  # noqa: E402
from hiposeg.palette import level_palette  # noqa: E402
from hiposeg.plots import curves, draw, require_plotting, scores  # noqa: E402
from hiposeg.plots.draw.ablation import draw_ablation  # noqa: E402
from hiposeg.plots.draw.confusion import draw_confusion  # noqa: E402
from hiposeg.plots.draw.curves import RunCurves, draw_curves  # noqa: E402
from hiposeg.plots.draw.featuremap import draw_feature_map  # noqa: E402
from hiposeg.plots.draw.gallery import GalleryRow, draw_gallery  # noqa: E402
from hiposeg.plots.draw.geometry import draw_geometry  # noqa: E402
from hiposeg.plots.draw.iou import draw_class_iou  # noqa: E402
from hiposeg.plots.draw.levels import draw_levels  # noqa: E402
from hiposeg.plots.geometry import geometry  # noqa: E402

require_plotting()


def bars(ax) -> int:
    return sum(len(c.patches) for c in ax.containers if isinstance(c, BarContainer))


def assert_written_and_not_blank(paths: list, suffixes: tuple[str, ...] = (".png",)) -> None:
    assert sorted(p.suffix for p in paths) == sorted(suffixes)
    png = next(p for p in paths if p.suffix == ".png")
    image = cv2.imread(str(png))
    assert image is not None and image.shape[0] > 100 and image.shape[1] > 100
    assert (image < 200).any(axis=2).mean() > 0.01  # more than a white page with a frame
    assert not list(png.parent.glob(".hiposeg-tmp*"))


def fake_report(h: Hierarchy, rng: np.random.Generator, absent: tuple[str, ...] = ()) -> dict:
    levels = {}
    for key, level in zip(("fine", "coarse", "top"), h.levels_above_fine):
        names = h.names(level)
        levels[key] = {"level": level, "mIoU": float(rng.uniform(30, 70)), "num_classes": len(names),
                       "IoU": {n: None if n in absent else float(rng.uniform(0, 100)) for n in names}}
    return {"levels": levels}


def test_per_class_iou_on_the_150_classes_of_ade20k(tmp_path):
    h = Hierarchy.load("ade20k")
    rng = np.random.default_rng(0)
    run, base = fake_report(h, rng, absent=("wall",)), fake_report(h, rng)
    rows = scores.class_rows(h, "class", run, base)
    groups = scores.grouped_by_gain(rows)
    colours = dict(zip(h.names("group"), level_palette(h, "group", "families")))
    fig = draw_class_iou(groups, "IoU per class", "hiposeg", "baseline", colours)
    ax_iou, ax_gain = fig.axes
    assert bars(ax_gain) == 149  # one bar per class with both IoUs ("wall" has none in the run)
    shown = [t.get_text() for t in ax_iou.get_yticklabels()]
    assert shown == [r.name for _, m in groups for r in m] and len(shown) == 150
    assert min(t.get_fontsize() for t in ax_iou.get_yticklabels()) >= 4
    group_names = [t.get_text() for t in ax_gain.texts if t.get_text() in h.names("group")]
    assert sorted(group_names) == sorted(h.names("group"))
    assert fig.get_size_inches()[1] > 20  # tall enough for 150 readable rows
    assert_written_and_not_blank(draw.save(fig, tmp_path, "iou", svg=True), (".png", ".svg"))
    alone = draw_class_iou(scores.grouped_by_gain(scores.class_rows(h, "class", run, None)), "IoU", "hiposeg",
                           None, colours)
    assert len(alone.axes) == 1 and bars(alone.axes[0]) == 149


def test_training_curves_have_a_panel_per_quantity_a_line_per_run_and_the_phases():
    rows_a = [{"iter": i, "lr": 0.01 / i, "loss": 2 / i, "ce": 1 / i, "fh": 0.5, "hh": 0.4} for i in range(10, 110, 10)]
    rows_a += [{"iter": 50, "eval": {"fine": 20.0, "coarse": 40.0}}, {"iter": 100, "eval": {"fine": 30.0, "coarse": 45.0}}]
    rows_b = [{"iter": i, "lr": 0.01 / i, "loss": 1 / i, "ce": 1 / i} for i in range(10, 110, 10)]
    runs = [RunCurves(n, curves.training_series(r), curves.eval_series(r)) for n, r in (("ce", rows_b), ("hipo", rows_a))]
    spans = [(0, 8, "CE"), (8, 100, "+ high")]
    fig = draw_curves(runs, spans)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["total loss (eq. 14)", "cross-entropy", "L_fh (eq. 7)",
                                                  "L_hh (eq. 8)", "learning rate", "validation mIoU (%)"]
    assert len(visible[0].lines) == 2 and len(visible[2].lines) == 1  # fh: only the HiPoSeg run logged it
    assert len(visible[-1].lines) == 2  # the HiPoSeg run's fine and coarse mIoU
    assert [t.get_text() for t in visible[0].texts] == ["CE", "+ high"]  # labelled along the top row
    assert len(visible[-1].texts) == 0  # ... and shaded, not labelled, below it
    assert len(visible[-1].patches) == 2


def test_levels_chart_has_a_bar_per_run_and_level(tmp_path):
    table = {"ce": {"fine": 40.0, "coarse": 60.0, "gap coarse - fine": 20.0},
             "hipo": {"fine": 45.0, "coarse": 58.0, "gap coarse - fine": 13.0}}
    fig = draw_levels(table, ["fine", "coarse"], {"fine": "part", "coarse": "object"})
    assert bars(fig.axes[0]) == 4
    assert any("coarse: +13.0" in t.get_text() for t in fig.axes[0].texts)
    assert_written_and_not_blank(draw.save(fig, tmp_path, "levels"))


def test_feature_map_has_a_point_per_sampled_pixel_and_a_legend_grouped_by_parent(tmp_path):
    h = Hierarchy.load("cityscapes")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(19), 30)
    maps = {"ce": rng.normal(size=(len(labels), 2)), "hipo": rng.normal(size=(len(labels), 2))}
    order, blocks = scores.hierarchy_order(h, "class")
    groups = [(name, order[a:b]) for name, a, b in blocks]
    fig = draw_feature_map(maps, labels, {"ce": "ce", "hipo": "hipo"}, h.names("class"),
                           level_palette(h, "class", "families"), groups, "t-SNE")
    panels = [ax for ax in fig.axes if ax.collections]
    assert len(panels) == 2 and all(len(ax.collections[0].get_offsets()) == 570 for ax in panels)
    legend = fig.legends[0]
    texts = [t.get_text() for t in legend.get_texts()]
    assert len(texts) == 19 + 7 and texts[0] == "flat" and texts[1].strip() == "road"
    assert [t.get_fontweight() for t in legend.get_texts()].count("bold") == 7
    assert_written_and_not_blank(draw.save(fig, tmp_path, "featuremap"))


def test_geometry_picture_shows_two_matrices_per_set_with_parents_outlined(tmp_path):
    h = Hierarchy.load("synthetic")
    rng = np.random.default_rng(0)
    fine, coarse = rng.normal(size=(15, 8)), rng.normal(size=(5, 8))
    g = geometry(fine, coarse, np.ones(15, bool), np.ones(5, bool), h.fine_to_coarse)
    order, blocks = scores.hierarchy_order(h, "part")
    fig = draw_geometry({"a": g, "b": g}, order, blocks, h.names("part"), h.names("object"), h.fine_to_coarse)
    ax_ff, ax_fc = fig.axes[0], fig.axes[1]
    assert ax_ff.images[0].get_array().shape == (15, 15) and ax_fc.images[0].get_array().shape == (15, 5)
    assert len(ax_ff.patches) == 5  # one outline per parent
    assert len(ax_fc.patches) == 15 and len(ax_fc.collections[0].get_offsets()) == 15  # a box and a dot per class
    assert sum(1 for ax in fig.axes if ax.images) == 4
    assert_written_and_not_blank(draw.save(fig, tmp_path, "geometry"))


def test_confusion_picture_has_a_matrix_per_model_in_hierarchy_order(tmp_path):
    h = Hierarchy.load("ade20k")
    k = h.num_fine
    mat = np.eye(k) * 0.7 + 0.3 / k
    order, blocks = scores.hierarchy_order(h, "class")
    fig = draw_confusion({"ce": mat, "hipo": mat}, order, blocks, h.names("class"), "confusion")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2 and panels[0].images[0].get_array().shape == (k, k)
    np.testing.assert_allclose(panels[0].images[0].get_array(), mat[np.ix_(order, order)])
    assert len(panels[0].get_yticklabels()) == 14  # 150 classes: one label per parent block
    assert len(panels[0].patches) == 14
    assert_written_and_not_blank(draw.save(fig, tmp_path, "confusion"))


def test_gallery_has_a_row_per_image_and_a_column_per_level_and_model(tmp_path):
    h = Hierarchy.load("synthetic")
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 15, (32, 32))
    rows = [GalleryRow(f"img{i}", "why", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
                       {"fine": truth, "coarse": h.fine_to_coarse[truth]},
                       {m: {"fine": truth, "coarse": h.fine_to_coarse[truth]} for m in ("ce", "hipo")}, "acc")
            for i in range(3)]
    rows[0].predictions["ce"]["fine"] = (truth + 1) % 15  # errors to mark
    palettes = {"fine": level_palette(h, "part", "families"), "coarse": level_palette(h, "object", "families")}
    legend = {"fine": list(zip(h.names("part"), palettes["fine"])), "coarse": list(zip(h.names("object"), palettes["coarse"]))}
    fig = draw_gallery(rows, palettes, {"fine": "part", "coarse": "object"}, legend)
    assert len(fig.axes) == 3 * 7  # image + (truth, ce, hipo) x (fine, coarse)
    assert fig.axes[2].collections  # the baseline's errors are outlined ...
    assert not fig.axes[3].collections  # ... a perfect prediction has none
    assert len(fig.legends[0].get_texts()) == 15 + 5
    assert_written_and_not_blank(draw.save(fig, tmp_path, "gallery"))


def test_ablation_chart_has_fine_and_coarse_bars_per_row_and_the_papers_values(tmp_path):
    rows = [{"config": "losses=ce", "fine": {"mean": 40.0, "std": 1.0, "n": 3}, "coarse": {"mean": 60.0, "std": 2.0, "n": 3},
             "paper": 73.55},
            {"config": "losses=all", "fine": {"mean": 45.0, "std": None, "n": 1}, "coarse": {"mean": 62.0, "std": None, "n": 1},
             "paper": 84.04},
            {"config": "diverged", "fine": {"mean": None, "std": None, "n": 0}, "coarse": {"mean": None, "std": None, "n": 0},
             "paper": None}]
    fig = draw_ablation(rows, "Ablation")
    ax = fig.axes[0]
    assert bars(ax) == 4
    assert len(ax.collections[-1].get_offsets()) == 2  # the paper's diamonds
    assert [t.get_text() for t in ax.get_yticklabels()] == ["losses=ce", "losses=all", "diverged"]
    assert_written_and_not_blank(draw.save(fig, tmp_path, "ablation", svg=True), (".png", ".svg"))
