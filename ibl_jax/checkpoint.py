"""Orbax checkpoints of a run: params, optimiser state, PRNG key, step and data-iterator position.

Layout: `RUN_DIR/checkpoints/<step>/{params, opt_state, meta}`. Three items, so evaluation and fine-tuning
restore `params` alone. Preservation keeps the latest K (what a resume needs) and the best by the
validation metric; the metric is saved with each step so "best" survives a restart.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies
from ibl_jax.errors import UserError

DAMAGED_SUFFIX = ".damaged"  # a step folder that cannot be restored is renamed `<step>.damaged`, never deleted


class CheckpointError(UserError):
  """A checkpoint cannot be written or read back: one line naming the step, the directory and the cause."""


class _DropNoise(logging.Filter):
  """Orbax's warnings about what this module does on purpose."""
  NOISE = ("Requested `tracked_metric`; did not provide metrics",  # saves between validations, by design
           "setting save_interval_steps=0", "Given directory is read only")  # evaluation opens runs read-only

  # Orbax's logged tracebacks of a failing asynchronous save: `Checkpointer.save`/`wait`/`close` raise that
  # failure as one `CheckpointError`, so the user reads it once, in one line.
  SAVE_FAILURES = ("Failed to write metadata", "raised an exception", "Handler Commit operations",
                   "Save Finalize thread", "Checkpointer failed")

  def filter(self, record: logging.LogRecord) -> bool:
    msg = str(record.msg)
    if record.levelno >= logging.ERROR and "/orbax/" in record.pathname:
      return not any(n in msg for n in self.SAVE_FAILURES)
    return not any(n in msg for n in self.NOISE)


logging.getLogger("absl").addFilter(_DropNoise())


class _DropAbandonedWrites(logging.Filter):
  """asyncio's "... exception was never retrieved" for Orbax's sibling tasks of a failed save or restore.

  When one TensorStore read or write fails, Orbax's `gather` raises it (we report it once, as one
  `CheckpointError`) and the other failed tasks are logged with a traceback whenever they are garbage-collected.
  """
  ORBAX_TASKS = (".orbax-checkpoint-tmp", "async_deserialize", "async_serialize", "tensorstore_spec")

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ("never retrieved" in message and any(n in message for n in self.ORBAX_TASKS)
                or ".orbax-checkpoint-tmp" in message)


logging.getLogger("asyncio").addFilter(_DropAbandonedWrites())


def _install_closed_loop_hook() -> None:
  """After a failed save, TensorStore's pending writes complete into Orbax's closed event loop, and each prints
  `RuntimeError: Event loop is closed` (through `sys.unraisablehook`) from `call_soon_threadsafe`, called by
  TensorStore's C++. Only those are dropped; the failure itself is one `CheckpointError`."""
  previous = sys.unraisablehook

  def hook(unraisable):
    tb = unraisable.exc_traceback
    if (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
        and tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe"):
      return
    previous(unraisable)

  sys.unraisablehook = hook


_install_closed_loop_hook()


def _cause(e: BaseException) -> str:
  """`Type: first line` of the innermost exception (TensorStore's reason, not Orbax's wrapper), kept short."""
  for _ in range(8):
    inner = e.__cause__ or e.__context__
    if inner is None:
      break
    e = inner
  text = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {text[:300]}"


MAXIMISED = ("cosmooth_bps", "decode_score")  # validation metrics where higher is better (the rest are losses)


def best_mode_of(metric: str) -> str:
  return "max" if metric in MAXIMISED else "min"


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for our three items."""

  def __init__(self, directory: str | Path, *, keep: int = 2, best_metric: str = "val_loss",
               best_mode: str | None = None, read_only: bool = False):
    self.best_metric = best_metric
    best_mode = best_mode or best_mode_of(best_metric)
    keep_policies = [policies.LatestN(n=keep)]
    if best_metric:
      # BestN sorts ascending (descending with reverse) and keeps the last n: reverse for "lower is better".
      keep_policies.append(policies.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min",
                                          n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep_policies),
        best_fn=(lambda m: m[best_metric]) if best_metric else None, best_mode=best_mode,
        create=not read_only, read_only=read_only, enable_async_checkpointing=True,
        cleanup_tmp_directories=not read_only)  # unfinished saves of a killed run
    self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                         item_names=("params", "opt_state", "meta"))
    self._in_flight = None  # the step of the asynchronous save not yet checked

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, *, params, opt_state, meta: dict[str, Any], metrics: dict[str, float] | None = None,
           force: bool = False) -> bool:
    """Saves asynchronously; `meta` is JSON (step, PRNG key data, data-iterator state, ...).

    Writes go to a temporary folder renamed on completion, so a kill or a failed write leaves the steps
    already saved intact; a failure (reported here or by the next `wait`) is one `CheckpointError`.
    """
    try:
      self._check_previous()
      saved = self.manager.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
          meta=ocp.args.JsonSave(meta)), metrics=metrics, force=force)
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (I/O errors come in many types)
      raise self._save_failed(step, e) from None
    self._in_flight = step if saved else self._in_flight
    return saved

  def _check_previous(self) -> None:
    """Raises the failure of the asynchronous save still in flight, if it failed."""
    step, self._in_flight = getattr(self, "_in_flight", None), None
    if step is None:
      return
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(step, e) from None
    if step not in self.manager.all_steps():  # Orbax logs a failed finalisation instead of raising it
      raise self._save_failed(step, RuntimeError("the save did not complete"))

  def _save_failed(self, step: int, e: BaseException) -> CheckpointError:
    # Orbax's other writes of this step fail too, in its own event loop, and asyncio would log each one with a
    # traceback ("Future exception was never retrieved") after our one line.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    self.manager.reload()
    kept = [s for s in self.manager.all_steps() if s != step]
    return CheckpointError(
        f"saving checkpoint step {step} in {self.manager.directory} failed ({_cause(e)}); the run stopped. "
        + (f"The steps saved before ({', '.join(map(str, kept))}) are intact: free space or fix the directory, "
           f"then rerun to resume from step {max(kept)}" if kept else "No earlier checkpoint exists"))

  def restore(self, step: int, *, abstract_params, abstract_opt_state) -> tuple[Any, Any, dict]:
    """Restores onto abstract targets whose leaves carry the target shardings (any device count)."""
    out = self._restore(step, ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params), opt_state=ocp.args.StandardRestore(abstract_opt_state),
        meta=ocp.args.JsonRestore()))
    _check_finite(step, self.manager.directory, out["params"])
    return out["params"], out["opt_state"], out["meta"]

  def restore_params(self, step: int, abstract_params=None):
    """Params alone (fine-tuning, evaluation); without a target, as saved (host arrays)."""
    args = ocp.args.StandardRestore(abstract_params) if abstract_params is not None else ocp.args.StandardRestore()
    params = self._restore(step, ocp.args.Composite(params=args))["params"]
    _check_finite(step, self.manager.directory, params)
    return params

  def restore_meta(self, step: int) -> dict:
    return self._restore(step, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def _restore(self, step: int, args):
    try:
      return self.manager.restore(step, args=args)
    except Exception as e:  # pylint: disable=broad-except  (TensorStore, JSON, missing files: all mean damaged)
      raise CheckpointError(f"checkpoint step {step} in {self.manager.directory} cannot be restored "
                            f"({_cause(e)})") from None

  def wait(self) -> None:
    self._check_previous()

  def close(self) -> None:
    try:
      self._check_previous()
    except CheckpointError:
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-except  (the same failure again: already reported)
        pass
      raise
    self.manager.close()


@jax.jit
def _all_finite(tree) -> jax.Array:
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def all_finite(tree) -> bool:
  """Every float leaf finite (one reduction on device; a collective in a multi-process run)."""
  return bool(_all_finite(tree))


def _check_finite(step: int, directory, params) -> None:
  if not all_finite(params):
    raise CheckpointError(f"checkpoint step {step} in {directory} cannot be restored (its parameters hold NaN or "
                          f"inf)")


def restore_newest(ckpt: Checkpointer, *, abstract_params, abstract_opt_state, check_meta=None):
  """Restores the newest step that restores completely; returns (step, params, opt_state, meta).

  A newer step that does not restore is named in one warning and set aside (renamed `<step>.damaged`, so the
  run can save that step again); when no step restores: one `CheckpointError`. `check_meta(meta)` may raise
  a `UserError` for a checkpoint that is whole but cannot be resumed.
  """
  failed = []
  for step in sorted(ckpt.all_steps(), reverse=True):
    try:
      meta = ckpt.restore_meta(step)
      if check_meta is not None:
        check_meta(meta)
      params, opt_state, meta = ckpt.restore(step, abstract_params=abstract_params,
                                             abstract_opt_state=abstract_opt_state)
    except CheckpointError as e:
      failed.append((step, str(e)))
      continue
    for bad, message in failed:
      print(f"warning: {message}; resuming from step {step} instead", file=sys.stderr)
    set_aside(ckpt, [bad for bad, _ in failed])
    return step, params, opt_state, meta
  raise CheckpointError(
      f"no checkpoint in {ckpt.manager.directory} restores completely ({len(failed)} tried; newest: "
      f"{failed[0][1]}); start over with --config.training.resume=False or another --config.run_name")


def set_aside(ckpt: Checkpointer, steps: list[int]) -> None:
  """Renames damaged step folders to `<step>.damaged` (process 0), so nothing is deleted and the step is free."""
  if not steps:
    return
  if jax.process_index() == 0:
    root = Path(ckpt.manager.directory)
    for step in steps:
      target = root / f"{step}{DAMAGED_SUFFIX}"
      n = 1
      while target.exists():
        target, n = root / f"{step}{DAMAGED_SUFFIX}{n}", n + 1
      (root / str(step)).rename(target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("checkpoint set aside")
  ckpt.manager.reload()


def abstract_with_shardings(tree, shardings):
  """`ShapeDtypeStruct`s carrying the shardings a restore should produce."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def resolve_step(checkpointer: Checkpointer, which: str | int = "best") -> int:
  """`best` (falls back to latest when no metric was saved), `latest`, or a step number."""
  steps = checkpointer.all_steps()
  if not steps:
    raise UserError(f"no checkpoint in {checkpointer.manager.directory}")
  if which == "best":
    best = checkpointer.best_step()
    return best if best is not None else checkpointer.latest_step()
  if which == "latest":
    return checkpointer.latest_step()
  if int(which) not in steps:
    raise UserError(f"no checkpoint at step {which} in {checkpointer.manager.directory} (have {steps})")
  return int(which)
