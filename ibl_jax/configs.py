"""Find and load the `configs/*.py` files (they are files, not a package).

From the repository root `--config=configs/ndt1.py` is a plain path. Anywhere else (an installed package, a Slurm
job's working directory) `--config=ndt1`, `--config=configs.ndt1` or `--config=configs/ndt1.py:paper` name the
same file among the configs that ship with ibl_jax (`config_dir()`); a path that exists always wins.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # a clone or an editable install


def config_dir() -> Path:
  """The shipped configs: the repository's `configs/`, or the installed copy (package `ibl_jax.config_files`)."""
  if REPO_CONFIG_DIR.is_dir():
    return REPO_CONFIG_DIR
  return Path(str(importlib.resources.files("ibl_jax.config_files")))


def config_module(name: str) -> ModuleType:
  """`configs/<name>.py` as a module (e.g. to call its `get_config` or `model_config`)."""
  path = config_dir() / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"ibl_jax_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(name: str, arg: str | None = None):
  """`configs/<name>.py`'s `get_config(arg)`."""
  return config_module(name).get_config(arg)


def resolve_config_path(value: str) -> str:
  """`--config` as a path `config_flags` can open: an existing path as is, else a shipped config by name.

  `configs/ndt1.py:paper`, `ndt1:paper`, `configs.ndt1:paper` and `ndt1.py` all name `<config_dir>/ndt1.py`
  with the argument `paper` when no such path exists relative to the working directory.
  """
  path, sep, arg = value.partition(":")
  if Path(path).exists():
    return value
  name = Path(path.replace(".py", "").replace("configs.", "")).name
  shipped = config_dir() / f"{name}.py"
  return f"{shipped}{sep}{arg}" if shipped.exists() else value


def resolve_config_argv(argv: list[str], default: str) -> tuple[list[str], str]:
  """The command line with its `--config=...` value resolved, and the resolved default."""
  out = []
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      a = "--config=" + resolve_config_path(a[len("--config="):])
    elif i > 0 and argv[i - 1] == "--config":
      a = resolve_config_path(a)
    out.append(a)
  return out, resolve_config_path(default)


def define_config_flag(default: str, help_text: str, *, lock_config: bool = True) -> None:
  """`--config` for an absl command, resolving names of shipped configs (see `resolve_config_path`)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  sys.argv, default = resolve_config_argv(sys.argv, default)
  config_flags.DEFINE_config_file("config", default, help_text, lock_config=lock_config)
