"""Load the repository's `configs/<name>.py` files as modules (they are files, not a package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def config_module(name: str) -> ModuleType:
  """`configs/<name>.py` as a module (e.g. to call its `get_config` or `model_config`)."""
  path = CONFIG_DIR / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"ibl_jax_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(name: str, arg: str | None = None):
  """`configs/<name>.py`'s `get_config(arg)`."""
  return config_module(name).get_config(arg)
