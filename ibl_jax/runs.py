"""Open a finished (or running) run directory: its config, session list, and a model with restored params.

Used by evaluation, fine-tuning and conversion, so every consumer reads a run the same way:
`RUN_DIR/config.json`, `RUN_DIR/corpus.json` (eids in session-index order, sources, neuron counts, region
vocabulary) and `RUN_DIR/checkpoints/<step>/params`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ml_collections import config_dict

from ibl_jax import checkpoint
from ibl_jax.errors import UserError


@dataclasses.dataclass
class Run:
  run_dir: Path
  config: config_dict.ConfigDict
  eids: list[str]
  sources: list[str]
  num_neurons: list[int]
  region_vocab: list[str]
  neuron_regions: list[list[int]] | None = None  # each session's region ids (runs from before they were saved: None)

  @property
  def n_max(self) -> int:
    return max(self.num_neurons)

  def session_index(self, eid: str) -> int | None:
    return self.eids.index(eid) if eid in self.eids else None


def find_run_dir(path: str | Path) -> Path:
  """Accepts a run directory, its `checkpoints/` folder, or one step folder inside it."""
  p = Path(path).expanduser()
  for candidate in (p, p.parent, p.parent.parent):
    if (candidate / "config.json").exists() and (candidate / "corpus.json").exists():
      return candidate
  if not p.exists():
    raise UserError(f"checkpoint {p}: no such directory")
  raise UserError(f"checkpoint {p}: not a run directory (no config.json and corpus.json in it or above it)")


def open_run(path: str | Path) -> Run:
  run_dir = find_run_dir(path)
  config = config_dict.ConfigDict(json.loads((run_dir / "config.json").read_text()))
  corpus = json.loads((run_dir / "corpus.json").read_text())
  return Run(run_dir=run_dir, config=config, eids=corpus["eids"], sources=corpus["sources"],
             num_neurons=corpus["num_neurons"], region_vocab=corpus["region_vocab"],
             neuron_regions=corpus.get("neuron_regions"))


def step_of(path: str | Path) -> str:
  """`best` unless the path names a step folder (`.../checkpoints/1500`)."""
  name = Path(path).name
  return name if name.isdigit() else "best"


def load_params(run: Run, which: str | int = "best"):
  """Returns (graphdef, params, step) of the run's model, params restored from its checkpoint (host arrays)."""
  from ibl_jax import steps as steps_lib  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(run.run_dir / "checkpoints", read_only=True,
                                 best_metric=run.config.training.get("best_metric", "val_loss"))
  step = checkpoint.resolve_step(ckpt, which)
  from flax import nnx  # pylint: disable=g-import-not-at-top
  # Shapes only (no random init): the checkpoint supplies every value.
  model = nnx.eval_shape(lambda: steps_lib.build_model(run.config.model, num_sessions=len(run.eids),
                                                       n_max=run.n_max, session_neurons=run.num_neurons,
                                                       session_regions=run.neuron_regions))
  graphdef, target = steps_lib.split_params(model)
  params = ckpt.restore_params(step, checkpoint.abstract_with_shardings(
      target, _single_device_tree(target)))
  ckpt.close()
  return graphdef, params, step


def _single_device_tree(tree):
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda _: device, tree)
