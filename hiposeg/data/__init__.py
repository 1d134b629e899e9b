"""Data: `hiposeg prepare` converters (one module per release), the built-in synthetic set, and
loading of prepared datasets for training (`dataset.py`, `transforms.py`).

`SOURCES` maps each `hiposeg prepare` sub-command to its converter class; the prepared format
they all write is described in README "Preparing data" and `prepare.py`.
"""

from __future__ import annotations

from hiposeg.data.ade20k import ADE20K
from hiposeg.data.cityscapes import Cityscapes
from hiposeg.data.folder import Folder
from hiposeg.data.mapillary import Mapillary
from hiposeg.data.pascal_part import PascalPart
from hiposeg.data.sources import Source

SOURCES: dict[str, type[Source]] = {s.name: s for s in (Cityscapes, ADE20K, Mapillary, PascalPart, Folder)}

__all__ = ["SOURCES", "ADE20K", "Cityscapes", "Folder", "Mapillary", "PascalPart", "Source"]
