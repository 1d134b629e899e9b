"""The `hiposeg` command line: each command parses its flags, builds a validated config and calls
one function. User mistakes (`UserError`) are printed as one clear message with exit code 2.

    app.py        the Typer app, `main`, the error printer
    hierarchy.py  hierarchy show | validate
    prepare.py    prepare SOURCE ...
    train.py      train, ablate (one set of training options)
    infer.py      eval, export, predict
    plot.py       plot (pictures and an HTML page from runs)
"""

from __future__ import annotations

# Importing a command module registers its commands; this order is the order of `hiposeg --help`.
from hiposeg.cli import prepare, train  # noqa: F401, I001
from hiposeg.cli import infer  # noqa: F401, I001
from hiposeg.cli import plot  # noqa: F401, I001
from hiposeg.cli import hierarchy  # noqa: F401, I001
from hiposeg.cli.app import _install_user_error_handler, app, main, normalize_argv

_install_user_error_handler(app)

__all__ = ["app", "main", "normalize_argv"]
