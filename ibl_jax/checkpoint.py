"""Orbax checkpoints of a run: params, optimiser state, PRNG key, step and data-iterator position.

Layout: `RUN_DIR/checkpoints/<step>/{params, opt_state, meta}`. Three items, so evaluation and fine-tuning
restore `params` alone. Preservation keeps the latest K (what a resume needs) and the best by the
validation metric; the metric is saved with each step so "best" survives a restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies
from ibl_jax.errors import UserError


MAXIMISED = ("cosmooth_bps",)  # validation metrics where higher is better (the rest are losses)


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
        create=not read_only, read_only=read_only, enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                         item_names=("params", "opt_state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, *, params, opt_state, meta: dict[str, Any], metrics: dict[str, float] | None = None,
           force: bool = False) -> bool:
    """Saves asynchronously; `meta` is JSON (step, PRNG key data, data-iterator state, ...)."""
    return self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta)), metrics=metrics, force=force)

  def restore(self, step: int, *, abstract_params, abstract_opt_state) -> tuple[Any, Any, dict]:
    """Restores onto abstract targets whose leaves carry the target shardings (any device count)."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params), opt_state=ocp.args.StandardRestore(abstract_opt_state),
        meta=ocp.args.JsonRestore()))
    return out["params"], out["opt_state"], out["meta"]

  def restore_params(self, step: int, abstract_params=None):
    """Params alone (fine-tuning, evaluation); without a target, as saved (host arrays)."""
    args = ocp.args.StandardRestore(abstract_params) if abstract_params is not None else ocp.args.StandardRestore()
    return self.manager.restore(step, args=ocp.args.Composite(params=args))["params"]

  def restore_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


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
