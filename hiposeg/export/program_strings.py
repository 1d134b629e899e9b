"""Which strings of a serialized torch.export program are plain: the ones torch resolves to a
callable (operator targets), evaluates (`sympy.sympify` of symbolic shapes), execs (guard code) or
writes into generated Python code (names) must be of the form hiposeg's exporter writes; anything else
would let a crafted `.pt2` run code when torch loads it (export/torch_export.py reads the archive).
"""

from __future__ import annotations

import ast
import json
import re

from hiposeg.models import PROGRAM_OPS

# Program fields torch keeps as text (never resolved, parsed as code or written into generated code).
TEXT_FIELDS = frozenset({"stack_trace", "nn_module_stack", "torch_fn", "torch_version"})
TREESPEC_FIELDS = frozenset({"in_spec", "out_spec"})
TREESPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict"})
# Every other string (names of tensors, parameters, modules, symbols, dict keys) is a plain dotted name.
PLAIN_NAME = re.compile(r"[A-Za-z0-9_.]*")
# Symbolic shapes, as torch writes them (sympy srepr): Add(FloorDiv(Symbol('s0', positive=True,
# integer=True), Integer(16)), Integer(1)). Nothing else reaches sympify's eval.
SYM_FUNCTIONS = frozenset({"Add", "Mul", "FloorDiv", "CeilDiv", "Mod", "Max", "Min",
                           "Eq", "Ne", "Lt", "Le", "Gt", "Ge"})
SYMBOL_ASSUMPTIONS = frozenset({"positive", "nonnegative", "integer", "real", "finite"})
SYMBOL_NAME = re.compile(r"[a-z]+[0-9]+")
RANGE_KEY = re.compile(r"(?:[0-9]+\*)?[a-z]+[0-9]+")  # a symbol, or a multiple of one (a family's side multiple)
MAX_SYM_EXPR = 2000
MAX_EXPONENT = 4
# Guard code (`plain_guard`): the characters, comparisons and operators of integer arithmetic on sizes.
GUARD_CHARACTERS = re.compile(r"[A-Za-z0-9_ ()\[\]'*+\-/%<>=!.,]*")
GUARD_COMPARISONS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
GUARD_OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod)


def unplain_string(field: str, text: str) -> str | None:
    """Why this program string is not plain (None when it is)."""
    if field in ("target", "as_operator"):
        return None if text in PROGRAM_OPS else f"it calls {text[:80]!r}, not an operator of a hiposeg program,"
    if field == "expr_str":
        return None if _plain_sym_expr(text) else \
            f"its symbolic shape {text[:80]!r}, which sympy would evaluate as Python,"
    if field in TREESPEC_FIELDS:
        return None if _plain_treespec(text) else f"its {field} names types other than tuples, lists and dicts"
    if field in TEXT_FIELDS:
        return None if all(c == "\n" or c.isprintable() for c in text) else f"its {field} holds control characters"
    if PLAIN_NAME.fullmatch(text):
        return None
    return f"its {field or 'key'} {text[:80]!r} is not a plain name (torch would write it into generated Python code)"


def _expression(text: str) -> ast.expr | None:
    """`text` parsed as one Python expression (None when it is not one, or too long to be hiposeg's)."""
    if len(text) > MAX_SYM_EXPR:
        return None
    try:
        return ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _plain_sym_expr(text: str) -> bool:
    """A sympy srepr of integer arithmetic on shape symbols (what torch.export writes); anything
    else would run through sympify's eval."""
    node = _expression(text)
    return node is not None and _plain_sym_node(node)


def _plain_sym_node(node: ast.expr) -> bool:
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        return False
    name, args, keywords = node.func.id, node.args, node.keywords
    if name == "Symbol":
        return (len(args) == 1 and _constant_of(args[0], str) and SYMBOL_NAME.fullmatch(args[0].value) is not None
                and all(k.arg in SYMBOL_ASSUMPTIONS and _constant_of(k.value, bool) for k in keywords))
    if name == "Integer":
        arg = args[0] if len(args) == 1 else None
        if isinstance(arg, ast.UnaryOp) and isinstance(arg.op, ast.USub):
            arg = arg.operand
        return not keywords and _constant_of(arg, int)
    if name == "Pow":  # x**k, with a small literal k (a large one would make sympy compute forever)
        return not keywords and len(args) == 2 and _plain_sym_node(args[0]) and _small_exponent(args[1])
    return name in SYM_FUNCTIONS and not keywords and bool(args) and all(_plain_sym_node(a) for a in args)


def _small_exponent(node: ast.expr) -> bool:
    """`Integer(k)` (sympy) or `k` (Python) with |k| <= MAX_EXPONENT."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Integer":
        node = node.args[0] if len(node.args) == 1 and not node.keywords else node
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    return _constant_of(node, int) and abs(node.value) <= MAX_EXPONENT


def plain_guard(text: str) -> bool:
    """Guard code as torch.export writes it for a program's inputs: comparisons of integer arithmetic
    on the input's sizes, e.g. `(1 + ((L['x'].size()[3] - 1) // 4)) != 1`. torch execs these into
    the module's input check (inside a string literal of its error message too), so anything else
    is refused: no names but `L`, no calls but `.size()` and torch.sym_max / sym_min, no strings but
    the input's plain name, no quotes, backslashes, comments or line breaks."""
    node = _expression(text) if GUARD_CHARACTERS.fullmatch(text) else None
    return node is not None and _plain_guard_node(node)


def _plain_guard_node(node: ast.expr) -> bool:
    if isinstance(node, ast.Compare):
        return (all(isinstance(op, GUARD_COMPARISONS) for op in node.ops)
                and all(_plain_guard_node(n) for n in (node.left, *node.comparators)))
    if isinstance(node, ast.BoolOp):
        return all(_plain_guard_node(v) for v in node.values)
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, (ast.USub, ast.Not)) and _plain_guard_node(node.operand)
    if isinstance(node, ast.BinOp):
        if isinstance(node.op, ast.Pow):
            return _plain_guard_node(node.left) and _small_exponent(node.right)
        return isinstance(node.op, GUARD_OPERATORS) and _plain_guard_node(node.left) and _plain_guard_node(node.right)
    if isinstance(node, ast.Call):  # torch.sym_max(a, b) / torch.sym_min(a, b)
        func = node.func
        return (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "torch"
                and func.attr in ("sym_max", "sym_min") and not node.keywords
                and all(_plain_guard_node(a) for a in node.args))
    return _constant_of(node, int) or _input_size(node)


def _input_size(node: ast.expr) -> bool:
    """`L['x'].size()[i]`: a dimension of an input, by its plain name."""
    if not (isinstance(node, ast.Subscript) and _constant_of(node.slice, int) and isinstance(node.value, ast.Call)):
        return False
    call = node.value
    if call.args or call.keywords or not (isinstance(call.func, ast.Attribute) and call.func.attr == "size"):
        return False
    source = call.func.value
    return (isinstance(source, ast.Subscript) and isinstance(source.value, ast.Name) and source.value.id == "L"
            and _constant_of(source.slice, str) and PLAIN_NAME.fullmatch(source.slice.value) is not None)


def _constant_of(node: ast.expr | None, kind: type) -> bool:
    """A literal of exactly this type (True is not an int here)."""
    return isinstance(node, ast.Constant) and type(node.value) is kind


def _plain_treespec(text: str) -> bool:
    """A pytree spec (JSON) of tuples, lists, dicts and leaves: no other type is looked up."""
    try:
        spec = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return False
    stack = [spec]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if "type" in value and value["type"] not in TREESPEC_TYPES:
                return False
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return True
