"""Importing and running a Triton kernel module on a machine without CUDA: under Triton's interpreter.

Triton reads TRITON_INTERPRET when a kernel is decorated and while the interpreter runs, so the module is imported
(or re-imported, if something imported it before) inside `interpreter_env()`, and tests run inside it too; the
caller's environment is restored afterwards. On a CUDA machine nothing is set and the kernels compile."""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from types import ModuleType

import torch

INTERPRET = not torch.cuda.is_available()
DEVICE = "cpu" if INTERPRET else "cuda"


@contextlib.contextmanager
def interpreter_env() -> Iterator[None]:
    """TRITON_INTERPRET=1 for the duration, when there is no CUDA."""
    saved = os.environ.get("TRITON_INTERPRET")
    if INTERPRET:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def import_triton_module(name: str) -> ModuleType:
    with interpreter_env():
        if INTERPRET and name in sys.modules:  # decorated earlier without the interpreter
            return importlib.reload(sys.modules[name])
        return importlib.import_module(name)
