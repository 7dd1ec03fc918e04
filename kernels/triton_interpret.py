"""Importing a Triton kernel module for a machine without CUDA: under Triton's interpreter (TRITON_INTERPRET=1).

Triton reads the variable when a kernel is decorated, so the module is imported (or re-imported, if something
imported it before) with the variable set, and the caller's environment is restored afterwards. Tests use this to
run the kernels on CPU; on a CUDA machine the module is imported as it is, compiled."""
from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import torch

INTERPRET = not torch.cuda.is_available()
DEVICE = "cpu" if INTERPRET else "cuda"


def import_triton_module(name: str) -> ModuleType:
    if not INTERPRET:
        return importlib.import_module(name)
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        if name in sys.modules:  # decorated earlier without the interpreter
            return importlib.reload(sys.modules[name])
        return importlib.import_module(name)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
