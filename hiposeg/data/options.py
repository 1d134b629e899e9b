"""The options of `hiposeg prepare` that more than one module needs to name."""

from __future__ import annotations

from enum import Enum


class UnknownPolicy(str, Enum):
    """What to do with raw label values the hierarchy does not list."""

    error = "error"
    ignore = "ignore"
