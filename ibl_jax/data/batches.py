"""Fixed-shape, padded training batches over a multi-session corpus, with a resumable position.

Every batch has the same shapes whatever sessions it mixes, so one compiled train step serves them all:

  spikes          uint8 [B, T, N_max]   counts; padded neurons and padded trials are 0
  neuron_mask     bool  [B, N_max]      real neurons of the trial's session
  time_mask       bool  [B, T]          real time bins (all False for a padding trial)
  neuron_regions  int32 [B, N_max]      corpus-wide region id per neuron, -1 for padding
  session_idx     int32 [B]             which session's stitch rows to use

Only when asked (`behaviours`, a supervised objective's targets; pretraining batches stay as they are):

  <target>        int32 [B]             choice, block: class index (schema.CLASS_VALUES), -1 when not scored
  <target>        float32 [B, T]        wheel-speed, whisker-motion-energy: standardised with the session's train
                                        split mean and std (so sessions of any scale share a head)
  <target>_mask   bool  [B, T]          the trace's scored bins (real trials and bins that have it)

Order: one seeded permutation of all (session, trial) pairs of the split per epoch, so batches mix sessions.
The iterator's state is `{"epoch", "position"}`: restoring it continues with exactly the batches an
uninterrupted run would have seen. On several hosts each process builds only its own rows of every global
batch (`process_index`/`process_count`); the state is the same on all of them.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ibl_jax.data import cache, schema
from ibl_jax.data.sessions import Corpus, Session
from ibl_jax.errors import UserError

BATCH_KEYS = ("spikes", "neuron_mask", "time_mask", "neuron_regions", "session_idx")


def trial_index(corpus: Corpus, split: str) -> np.ndarray:
  """All (session_idx, trial) pairs of a split, `int64 [M, 2]`, in corpus order."""
  parts = [np.stack([np.full(s.splits[split].spikes.shape[0], s.session_idx), np.arange(
      s.splits[split].spikes.shape[0])], axis=1) for s in corpus.sessions if split in s.splits]
  if not parts:
    raise UserError(f"no session of the corpus has a {split!r} split")
  return np.concatenate(parts).astype(np.int64)


def class_index(values_K: np.ndarray, target: str) -> np.ndarray:
  """Class of each value (its position in schema.CLASS_VALUES[target]), -1 for a value not listed."""
  classes = np.asarray(schema.CLASS_VALUES[target], np.float64)
  match_KxC = np.isclose(np.asarray(values_K, np.float64)[:, None], classes[None, :])
  return np.where(match_KxC.any(1), match_KxC.argmax(1), -1).astype(np.int32)


def trace_scale(session: Session, target: str) -> tuple[float, float]:
  """(mean, std) of a trace over the session's train split (the fit trials), for standardising it."""
  split = session.splits.get("train") or next(iter(session.splits.values()))
  values = split.behaviour.get(target)
  if values is None or not values.size:
    return 0.0, 1.0
  std = float(np.std(values))
  return float(np.mean(values)), std if std > 0 else 1.0


def _add_behaviours(batch, session: Session, split: str, rows, trials, behaviours, T: int) -> None:
  values = session.splits[split].behaviour
  for target in behaviours:
    if target not in values:
      continue  # stays "not scored"
    if target in schema.CLASS_VALUES:
      batch[target][rows] = class_index(values[target][trials], target)
    else:
      mean, std = trace_scale(session, target)
      batch[target][rows] = (values[target][trials] - mean) / std
      batch[f"{target}_mask"][rows] = True


def assemble(corpus: Corpus, split: str, pairs_Mx2: np.ndarray, batch_size: int,
             behaviours: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  """Builds one padded batch from (session_idx, trial) pairs; rows past `len(pairs)` are padding trials.

  `behaviours`: targets to carry (see the module docstring); none for masked modelling.
  """
  T, n_max = corpus.num_bins, corpus.n_max
  batch = {"spikes": np.zeros((batch_size, T, n_max), np.uint8),
           "neuron_mask": np.zeros((batch_size, n_max), bool),
           "time_mask": np.zeros((batch_size, T), bool),
           "neuron_regions": np.full((batch_size, n_max), -1, np.int32),
           "session_idx": np.zeros(batch_size, np.int32)}
  for target in behaviours:
    if target in schema.CLASS_VALUES:
      batch[target] = np.full(batch_size, -1, np.int32)
    elif target in schema.TRACE_BEHAVIOURS:
      batch[target] = np.zeros((batch_size, T), np.float32)
      batch[f"{target}_mask"] = np.zeros((batch_size, T), bool)
    else:
      raise UserError(f"behaviour {target!r} cannot be decoded; choose from "
                      f"{', '.join([*schema.CLASS_VALUES, *schema.TRACE_BEHAVIOURS])}")
  for s_idx in np.unique(pairs_Mx2[:, 0]):  # group rows by session: one fancy-index copy per session
    rows = np.flatnonzero(pairs_Mx2[:, 0] == s_idx)
    session = corpus.sessions[int(s_idx)]
    n = session.num_neurons
    batch["spikes"][rows, :, :n] = cache.take_trials(session.splits[split].spikes, pairs_Mx2[rows, 1])
    batch["neuron_mask"][rows, :n] = True
    batch["time_mask"][rows] = True
    batch["neuron_regions"][rows, :n] = session.region_ids
    batch["session_idx"][rows] = s_idx
    _add_behaviours(batch, session, split, rows, pairs_Mx2[rows, 1], behaviours, T)
  return batch


def local_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  """This process's rows of every global batch of `batch_size`."""
  if batch_size % process_count:
    raise UserError(f"batch size {batch_size} is not divisible by the {process_count} processes")
  return slice(process_index * batch_size // process_count, (process_index + 1) * batch_size // process_count)


class BatchIterator:
  """Endless seeded, shuffled batches of a split; `state()`/`restore()` make it resumable."""

  def __init__(self, corpus: Corpus, split: str, batch_size: int, *, seed: int = 0,
               process_index: int = 0, process_count: int = 1, behaviours: tuple[str, ...] = ()):
    self.local_rows = local_rows(batch_size, process_index, process_count)
    self.corpus, self.split, self.batch_size, self.seed = corpus, split, batch_size, seed
    self.behaviours = tuple(behaviours)
    self.pairs = trial_index(corpus, split)
    if len(self.pairs) < batch_size:
      raise UserError(f"split {split!r} has {len(self.pairs)} trials in all, fewer than one batch of {batch_size}")
    self.epoch, self.position = 0, 0
    self._order = self._permutation(0)

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))

  def state(self) -> dict[str, int]:
    return {"epoch": int(self.epoch), "position": int(self.position)}

  def restore(self, state: dict[str, int]) -> None:
    self.epoch, self.position = int(state["epoch"]), int(state["position"])
    self._order = self._permutation(self.epoch)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.position + self.batch_size > len(self._order):  # drop the remainder: fixed shapes, fresh epoch
      self.epoch, self.position = self.epoch + 1, 0
      self._order = self._permutation(self.epoch)
    take = self._order[self.position:self.position + self.batch_size][self.local_rows]
    self.position += self.batch_size
    return assemble(self.corpus, self.split, self.pairs[take], len(take), self.behaviours)


def sequential_batches(corpus: Corpus, split: str, batch_size: int, *, sessions: list[int] | None = None,
                       max_batches: int | None = None, behaviours: tuple[str, ...] = (),
                       process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Every trial of a split once, in order; the last batch is filled with padding trials (no targets).

  With several processes each builds only its rows of every global batch (as `BatchIterator`), so it reads only
  those trials' counts.
  """
  local = local_rows(batch_size, process_index, process_count)
  pairs = trial_index(corpus, split)
  if sessions is not None:
    pairs = pairs[np.isin(pairs[:, 0], sessions)]
  for n, start in enumerate(range(0, len(pairs), batch_size)):
    if max_batches is not None and n >= max_batches:
      return
    yield assemble(corpus, split, pairs[start:start + batch_size][local], local.stop - local.start, behaviours)
