"""The peer benchmark runs at a tiny size and compares like with like: hiposeg's DeepLabV3+ has
exactly the parameters of segmentation_models_pytorch's DeepLabV3Plus (both are the paper's
separable model), and the HiPoSeg training model adds only its projection head."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PROJECTION_HEAD = 256 * 256 + 2 * 256 + 256 * 256 + 256  # conv 256->256 (no bias), BN, conv 256->d'=256


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
