"""`hiposeg plot`: the paper's pictures from any run (and a baseline run, and an ablation), and one
self-contained HTML page that shows them with the numbers behind them.

Numbers (plain NumPy / torch, tested exactly; no plotting library):

    inputs.py     run and ablation directories: config, metrics.jsonl, report.json, checkpoints
    curves.py     loss, learning-rate and mIoU series of metrics.jsonl; the sequential phases
    scores.py     per-class IoU and its gain, classes grouped under their parents, mIoU per level,
                  ablation rows, the gallery's choice of images
    sampling.py   one pass over the validation split: balanced, seeded pixel samples of the stride-4
                  decoder feature, class-mean features, per-image accuracy
    geometry.py   prototype geometry: cosine similarities, nearest parent, within- vs between-parent
    embed.py      t-SNE / PCA / UMAP of the sampled features, and their neighbour agreement

Drawing (matplotlib, Agg backend; one module per picture kind, under `draw/`), the HTML page
(`page.py`) and the command's work from inputs to files (`build.py`). matplotlib and scikit-learn are
the optional `plots` extra: `require_plotting` turns their absence into a one-line install hint.
"""

from __future__ import annotations

import importlib

from hiposeg.errors import UserError

INSTALL_HINT = "pip install 'hiposeg[plots]'"
PLOTTING_MODULES = ("matplotlib", "sklearn")


def require_plotting() -> None:
    """Import matplotlib (Agg backend: no display needed) and scikit-learn, or say how to install them."""
    missing = []
    for name in PLOTTING_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append({"sklearn": "scikit-learn"}.get(name, name))
    if missing:
        raise UserError(f"`hiposeg plot` needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                        f"not installed: {INSTALL_HINT}")
    import matplotlib

    matplotlib.use("Agg")
