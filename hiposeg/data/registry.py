"""The dataset sources `hiposeg prepare` knows, in the order `hiposeg prepare --help` lists them.

Why one list: the `prepare` sub-commands (their help and flags), the hints that name the command
to run for a missing dataset, and `hierarchy show`'s list of built-in names all come from here.
Adding a converter is its module (a `sources.Source` subclass: docstring = the sub-command's help,
`flags` = its options), its built-in hierarchy in `hierarchies/`, one entry in `SOURCES` below,
its tests and a README row; nothing else changes.
"""

from __future__ import annotations

from hiposeg.data.ade20k import ADE20K
from hiposeg.data.cityscapes import Cityscapes
from hiposeg.data.folder import Folder
from hiposeg.data.mapillary import Mapillary
from hiposeg.data.pascal_part import PascalPart
from hiposeg.data.sources import Source

SOURCES: dict[str, type[Source]] = {s.name: s for s in (Cityscapes, ADE20K, Mapillary, PascalPart, Folder)}
SYNTHETIC = "synthetic"  # `hiposeg prepare synthetic`: the built-in set, generated rather than converted


def command_for_dataset(name: str) -> str | None:
    """The `hiposeg prepare` sub-command that makes the dataset called `name` (a recipe name such as
    `pascal-part`, or a folder name such as `pascal_part`): a release's converter or the synthetic
    set. None otherwise: `folder` needs the user's hierarchy file, so it is never guessed."""
    command = name.replace("_", "-")
    if command == SYNTHETIC or (command in SOURCES and SOURCES[command].default_hierarchy):
        return command
    return None


def builtin_hierarchy_names() -> list[str]:
    """The releases' built-in hierarchies and the synthetic set's, in the order of `SOURCES`."""
    return [h for s in SOURCES.values() if s.default_hierarchy for h in (s.default_hierarchy, *s.release_hierarchies)] \
        + [SYNTHETIC]
