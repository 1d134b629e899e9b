"""The hierarchy file format (`hierarchies/*.json`, README "Hierarchy files") and its validation.

Why a module of its own: a hierarchy file is written by hand, so everything that can be wrong in
it is checked here and named in terms of the file (the level, the class, the field), never of the
code that reads it. The Pydantic models hold the structural rules; `spec_problems` checks the
cross-references (ids, parents, raw values, training levels). `hierarchy.Hierarchy` builds the
tables hiposeg uses from a validated spec.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError,
                      field_validator)

FORMAT = "hiposeg-hierarchy/1"
MAX_RAW_VALUE = 65535  # label PNGs are 8- or 16-bit
# Prepared label maps are 16-bit PNGs at most and 65535 is their ignore value: ids 0..65534.
MAX_CLASSES_PER_LEVEL = 65535


def _in_raw_range(values: list[int], what: str) -> list[int]:
    """`values` if each fits a 16-bit label PNG, else the Pydantic error naming the first that does not."""
    for r in values:
        if not 0 <= r <= MAX_RAW_VALUE:
            raise ValueError(f"{what} {r} is outside 0..{MAX_RAW_VALUE}")
    return values

# Names, titles and sources are printed to terminals (`hierarchy show`, eval tables, messages), where
# an ESC starts a command (clear the screen, fake output, OSC 8 links, OSC 52 clipboard writes) and
# bidi or zero-width characters make text read other than it is: such characters are refused.
UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})  # controls, format, surrogates, line/para sep.
C0_NAMES = ("NUL SOH STX ETX EOT ENQ ACK BEL BS TAB LF VT FF CR SO SI DLE DC1 DC2 DC3 DC4 NAK SYN ETB CAN EM SUB ESC "
            "FS GS RS US").split()
C1_NAMES = ("PAD HOP BPH NBH IND NEL SSA ESA HTS HTJ VTS PLD PLU RI SS2 SS3 DCS PU1 PU2 STS CCH MW SPA EPA SOS SGCI "
            "SCI CSI ST OSC PM APC").split()


def character_name(ch: str) -> str:
    """'U+001B ESC', 'U+202E RIGHT-TO-LEFT OVERRIDE': how a message names a character."""
    code = ord(ch)
    if code < 0x20:
        name = C0_NAMES[code]
    elif code == 0x7F:
        name = "DEL"
    elif 0x80 <= code < 0xA0:
        name = C1_NAMES[code - 0x80]
    else:
        name = unicodedata.name(ch, "unnamed")
    return f"U+{code:04X} {name}"


def printable_text(value: str) -> str:
    """`value` if it holds no control or format character (see UNPRINTABLE_CATEGORIES); else the
    Pydantic error naming the first one."""
    bad = next((ch for ch in value if unicodedata.category(ch) in UNPRINTABLE_CATEGORIES), None)
    if bad is not None:
        raise ValueError(f"contains the character {character_name(bad)} (a control or invisible formatting "
                         "character): names are printed to terminals, where it could run terminal commands or "
                         "disguise the text; remove it")
    return value


PrintableStr = Annotated[str, AfterValidator(printable_text)]


# --------------------------------------------------------------------------------------------
# The file schema (Pydantic). Structural rules live here; cross-references are checked below.
# --------------------------------------------------------------------------------------------


class ClassSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Strict types: JSON `true` or `1.0` is not an id or a raw value (lax parsing would read them as 1).
    id: StrictInt = Field(ge=0, description="contiguous id within its level, 0..K-1")
    name: PrintableStr = Field(min_length=1)
    color: tuple[StrictInt, StrictInt, StrictInt] = Field(description="display colour, RGB 0..255")
    parent: PrintableStr | None = Field(None, description="name of the parent class in the next level up")
    raw: list[StrictInt] | None = Field(None, description="leaf level only: raw label values of this class")
    evaluate: StrictBool = Field(True, description="False for classes a benchmark does not score")
    description: PrintableStr | None = None

    @field_validator("color")
    @classmethod
    def _color_range(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        for c in v:
            if not 0 <= c <= 255:
                raise ValueError(f"colour {list(v)} has a component outside 0..255")
        return v

    @field_validator("raw")
    @classmethod
    def _raw_range(cls, v: list[int] | None) -> list[int] | None:
        return v if v is None else _in_raw_range(v, "raw value")


class LevelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: PrintableStr = Field(min_length=1)
    classes: list[ClassSpec] = Field(min_length=1)


class TrainLevels(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fine: PrintableStr
    coarse: PrintableStr


class RawSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ignore: list[StrictInt] = Field(default_factory=list, description="raw values that mean 'ignore'")

    @field_validator("ignore")
    @classmethod
    def _ignore_range(cls, v: list[int]) -> list[int]:
        return _in_raw_range(v, "raw ignore value")


class HierarchySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["hiposeg-hierarchy/1"] = FORMAT
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    title: PrintableStr | None = None
    source: PrintableStr = Field(min_length=1, description="where this hierarchy comes from, stated honestly")
    levels: list[LevelSpec] = Field(min_length=2, description="leaves first, root-most last")
    train: TrainLevels | None = None
    raw: RawSpec = Field(default_factory=RawSpec)


# --------------------------------------------------------------------------------------------
# Cross-reference checks: every message names the level, the class and the field.
# --------------------------------------------------------------------------------------------


def _where(spec: HierarchySpec, li: int, ci: int | None = None) -> str:
    lvl = spec.levels[li]
    if ci is None:
        return f"levels[{li}] ({lvl.name!r})"
    c = lvl.classes[ci]
    return f"levels[{li}] ({lvl.name!r}) class {c.name!r} (classes[{ci}], id {c.id})"



def spec_problems(spec: HierarchySpec) -> list[str]:
    """Every cross-reference problem of a structurally valid file, each naming the level, class and field."""
    problems: list[str] = []
    names = [lvl.name for lvl in spec.levels]
    seen_lvl: set[str] = set()
    for li, lvl in enumerate(spec.levels):
        if lvl.name in seen_lvl:
            problems.append(f"{_where(spec, li)}: duplicate level name {lvl.name!r}")
        seen_lvl.add(lvl.name)
        if len(lvl.classes) > MAX_CLASSES_PER_LEVEL:
            problems.append(f"{_where(spec, li)}: {len(lvl.classes)} classes, but prepared label maps are 16-bit PNGs "
                            f"in which {MAX_CLASSES_PER_LEVEL} means ignore, so a level holds at most "
                            f"{MAX_CLASSES_PER_LEVEL} classes (ids 0..{MAX_CLASSES_PER_LEVEL - 1}): merge classes")

    for li, lvl in enumerate(spec.levels):
        by_name: dict[str, int] = {}
        by_id: dict[int, int] = {}
        for ci, c in enumerate(lvl.classes):
            if c.name in by_name:
                problems.append(f"{_where(spec, li, ci)}: duplicate name {c.name!r} (also classes[{by_name[c.name]}])")
            by_name.setdefault(c.name, ci)
            if c.id in by_id:
                problems.append(f"{_where(spec, li, ci)}: duplicate id {c.id} (also classes[{by_id[c.id]}])")
            by_id.setdefault(c.id, ci)
        ids = sorted(by_id)
        if ids != list(range(len(ids))) or len(by_id) != len(lvl.classes):
            missing = sorted(set(range(len(lvl.classes))) - set(ids))
            problems.append(f"{_where(spec, li)}: ids must be contiguous 0..{len(lvl.classes) - 1}; "
                            f"missing {missing[:10]}, found {ids[:10]}{'...' if len(ids) > 10 else ''}")

        top = li == len(spec.levels) - 1
        parent_names = {c.name for c in spec.levels[li + 1].classes} if not top else set()
        for ci, c in enumerate(lvl.classes):
            if top and c.parent is not None:
                problems.append(f"{_where(spec, li, ci)}: has parent {c.parent!r} but is in the top level")
            if not top:
                if c.parent is None:
                    problems.append(f"{_where(spec, li, ci)}: no 'parent' (every class below the top level needs one "
                                    f"from level {spec.levels[li + 1].name!r})")
                elif c.parent not in parent_names:
                    problems.append(f"{_where(spec, li, ci)}: parent {c.parent!r} is not a class of level "
                                    f"{spec.levels[li + 1].name!r}")
            if li > 0 and c.raw is not None:
                problems.append(f"{_where(spec, li, ci)}: 'raw' is only allowed on the leaf level ({names[0]!r})")
        if li > 0:
            used = {c.parent for c in spec.levels[li - 1].classes}
            for ci, c in enumerate(lvl.classes):
                if c.name not in used:
                    problems.append(f"{_where(spec, li, ci)}: has no children in level {spec.levels[li - 1].name!r} "
                                    "(a parent without children)")

    leaves = spec.levels[0].classes
    with_raw = [c for c in leaves if c.raw is not None]
    if with_raw and len(with_raw) != len(leaves):
        missing = [c.name for c in leaves if c.raw is None]
        problems.append(f"{_where(spec, 0)}: either every leaf class lists 'raw' values or none does "
                        f"(identity mapping); missing on {missing[:8]}")
    owner: dict[int, str] = {}
    for ci, c in enumerate(leaves):
        for r in c.raw or []:
            if r in owner:
                problems.append(f"{_where(spec, 0, ci)}: raw value {r} is mapped twice (also by {owner[r]!r})")
            owner.setdefault(r, c.name)
    ignore = set(spec.raw.ignore)
    if with_raw:
        both = sorted(ignore & set(owner))
        if both:
            problems.append(f"raw.ignore: values {both} are also mapped to classes ({[owner[b] for b in both][:5]})")
    else:
        both = sorted(ignore & {c.id for c in leaves})
        if both:
            problems.append(f"raw.ignore: values {both} are also leaf ids (the identity mapping uses them)")

    if spec.train is not None:
        for key in ("fine", "coarse"):
            v = getattr(spec.train, key)
            if v not in names:
                problems.append(f"train.{key}: unknown level {v!r}; the levels are {names}")
        if spec.train.fine in names and spec.train.coarse in names and \
                names.index(spec.train.coarse) <= names.index(spec.train.fine):
            problems.append(f"train: coarse level {spec.train.coarse!r} must be above fine level {spec.train.fine!r} "
                            f"(levels are listed leaves first: {names})")
    return problems


def format_validation_error(e: ValidationError, data: Any) -> str:
    """Pydantic's errors as one line each, located in the file (naming the class when inside one)."""
    lines = []
    for err in e.errors():
        loc = err["loc"]
        where = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[")
        # name the class when the error is inside one
        try:
            if len(loc) >= 4 and loc[0] == "levels" and loc[2] == "classes":
                cls = data["levels"][loc[1]]["classes"][loc[3]]
                if isinstance(cls, dict) and "name" in cls:
                    where += f" (class {cls['name']!r})"
        except (KeyError, IndexError, TypeError):
            pass
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see README.md 'Hierarchy files')"
        elif err["type"] in ("int_type", "bool_type"):
            msg = _wrong_type(err["input"], "an integer" if err["type"] == "int_type" else "true or false")
        lines.append(f"  - {where or '(top level)'}: {msg}")
    return "\n".join(lines)


JSON_KINDS = {bool: "a boolean", int: "an integer", float: "a number with a decimal point", str: "a string",
              list: "a list", dict: "an object", type(None): "null"}


def _wrong_type(value: Any, expected: str) -> str:
    """'got true (a boolean): write an integer' — the value as it is written in the JSON file."""
    try:
        shown = json.dumps(value)
    except (TypeError, ValueError):
        shown = repr(value)
    return f"got {shown[:40]} ({JSON_KINDS.get(type(value), type(value).__name__)}): write {expected}"
