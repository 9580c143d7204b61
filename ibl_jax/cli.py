"""What every command line shares: quiet library logs and one-line user errors.

By default a command prints only its own progress bars and results; `-v`/`--verbosity` brings the libraries'
INFO logs back (JAX's backend probing, `datasets`, Orbax, matplotlib's font cache). A `UserError` (bad config,
bad data, a missing file) is printed as one line with exit status 2; anything else is a bug and raises with its
traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from ibl_jax.errors import UserError

NOISY_LOGGERS = ("jax", "jax._src.xla_bridge", "absl", "datasets", "orbax", "matplotlib", "tensorboardX", "filelock",
                 "fsspec", "urllib3", "h5py", "hdmf", "pynwb")


def quiet_logs(verbosity: int = 0) -> None:
  """Verbosity 0: warnings and errors only; 1 or more: the libraries' INFO logs too."""
  level = logging.INFO if verbosity > 0 else logging.WARNING
  if verbosity <= 0:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ INFO lines
    warnings.filterwarnings("ignore", message=".*`tracked_metric`.*")
  logging.getLogger().setLevel(level)
  for name in NOISY_LOGGERS:
    logging.getLogger(name).setLevel(level)
  try:
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.set_verbosity(absl_logging.INFO if verbosity > 0 else absl_logging.WARNING)
  except ImportError:
    pass
  try:
    import datasets  # pylint: disable=g-import-not-at-top
    (datasets.logging.set_verbosity_info if verbosity > 0 else datasets.logging.set_verbosity_warning)()
  except ImportError:
    pass


def add_verbosity_flag(parser) -> None:
  """`-v` (repeatable) / `--verbosity N` on an argparse parser."""
  parser.add_argument("-v", "--verbosity", action="count", default=0,
                      help="show the libraries' INFO logs (JAX, datasets, Orbax, ...); quiet by default")


def one_line(error: BaseException) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


def run_guarded(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, int]:
  """Calls fn; a `UserError` or a missing file becomes `error: <one line>` on stderr and status 2."""
  try:
    return fn(*args, **kwargs), 0
  except (UserError, FileNotFoundError) as e:
    print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
    return None, 2


def absl_verbosity() -> int:
  """1 when an absl command (train, finetune, bench) was given `-v 0`/`--verbosity=0` or more, else 0."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  return 1 if flags.FLAGS["verbosity"].present and int(flags.FLAGS.verbosity) >= 0 else 0


def split_cpu(mesh_cfg) -> None:
  """A step command's first act (train, finetune, bench), before any JAX work: splits a CPU host into
  `mesh.cpu_devices` devices, after restarting with malloc reusing freed memory (`mesh.reuse_freed_memory`). A
  bad value ends the command with its one-line error (status 2)."""
  from ibl_jax import parallel  # pylint: disable=g-import-not-at-top
  _, status = run_guarded(parallel.set_cpu_devices, mesh_cfg.get("cpu_devices", 0),
                          reuse_freed_memory=mesh_cfg.get("reuse_freed_memory", False))
  if status:
    sys.exit(status)


def split_cpu_like_run(checkpoint) -> None:
  """Splits a CPU host into the devices the run trained on (`mesh.cpu_devices`), before any JAX work, so
  evaluation and prediction shard their chunks as training sharded its batches. A path that is not a run is
  left for the command itself to report."""
  from ibl_jax import parallel, runs  # pylint: disable=g-import-not-at-top
  try:
    mesh = runs.open_run(checkpoint).config.get("mesh", {})
  except (UserError, OSError, ValueError):
    return
  parallel.set_cpu_devices(mesh.get("cpu_devices", 0))
