"""`--compile` (`train`, `predict`): torch.compile with a graceful fallback to eager execution.

`torch.compile` is lazy: it compiles on the first call, and that is where a missing backend shows
(no C++ compiler for inductor on the CPU, no Triton on a GPU, a Python torch.compile does not
support). Such a run should not die after its setup and data checks, nor silently run slower:
`compiled(module, what)` returns a callable that tries the compiled module on its first call and, if
compilation fails, prints one warning naming the cause and runs the eager module from then on.
Errors of the model itself (a shape mismatch, an out-of-memory) are not compilation failures: they
raise as they would without `--compile`.

Shapes: training calls the model with one crop size, so it compiles once (the criterion's phase
changes do not reach the compiled graph: the loss terms stay eager). `predict` groups images by
size; each new size is a new specialisation, capped by torch._dynamo's `recompile_limit`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

BACKEND = "inductor"  # torch.compile's default; the engine tests trace with "aot_eager" (no C++ build)
WARNING = "hiposeg: --compile: torch.compile could not compile the {what} ({cause}); running it uncompiled (eager)"


def compile_failures() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this model could not be compiled here", not "the model is wrong"."""
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import CppCompileError, InvalidCxxCompiler

    return BackendCompilerFailed, InvalidCxxCompiler, CppCompileError


def first_line(error: BaseException) -> str:
    """`Type: first line of the message` (compiler errors can run to pages)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


class CompiledOrEager:
    """Calls `torch.compile(module)`; after a compilation failure, warns once and calls `module`."""

    def __init__(self, module: nn.Module, what: str, warn: Callable[[str], None] | None = None) -> None:
        self.eager, self.what = module, what
        self.warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.fallback: str | None = None  # the cause, once compilation has failed
        try:
            self.compiled: Callable[..., Any] = torch.compile(module, backend=BACKEND)
        except RuntimeError as e:  # e.g. a Python version torch.compile does not support
            self.fall_back(e)

    def fall_back(self, error: BaseException) -> None:
        self.fallback = first_line(error)
        self.warn(WARNING.format(what=self.what, cause=self.fallback))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fallback is None:
            try:
                return self.compiled(*args, **kwargs)
            except compile_failures() as e:
                self.fall_back(e)
        return self.eager(*args, **kwargs)


def maybe_compiled(module: nn.Module, enabled: bool, what: str) -> Callable[..., Any]:
    """`module` itself, or its `CompiledOrEager` wrapper when `enabled` (`--compile`)."""
    return CompiledOrEager(module, what) if enabled else module
