"""The IBL session schema (docs/design.md §3): column names, CSR encode/decode, and validation errors.

A trial's binned spike counts `[T, N]` are stored as a CSR matrix (rows = time bins, columns = neurons) in
four columns. Decoding is vectorised over all trials of a split: the per-trial `indptr` arrays are turned into
one row index per non-zero, and every non-zero is scattered into a dense `uint8 [K, T, N]` array at once.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ibl_jax.errors import UserError

SPIKES_DATA = "spikes_sparse_data"
SPIKES_INDICES = "spikes_sparse_indices"
SPIKES_INDPTR = "spikes_sparse_indptr"
SPIKES_SHAPE = "spikes_sparse_shape"
SPIKE_COLUMNS = (SPIKES_DATA, SPIKES_INDICES, SPIKES_INDPTR, SPIKES_SHAPE)

REGIONS = "cluster_regions"
DEPTHS = "cluster_depths"
UUIDS = "cluster_uuids"
NEURON_COLUMNS = (REGIONS, DEPTHS, UUIDS)

EID = "eid"
TRUE_RATES = "true_rates"  # synthetic sessions only: [T][N] rates (spikes per bin) the counts were drawn from

TRIAL_BEHAVIOURS = ("choice", "block", "reward")  # one float per trial
TRACE_BEHAVIOURS = ("wheel-speed", "whisker-motion-energy")  # [T] floats per trial
BEHAVIOURS = TRIAL_BEHAVIOURS + TRACE_BEHAVIOURS
# Decoded as classes (ibl_jax/models/heads.py): the values each class stands for (IBL: choice -1/+1, block prior).
CLASS_VALUES = {"choice": (-1.0, 1.0), "block": (0.2, 0.5, 0.8)}

SPLITS = ("train", "val", "test")
BINSIZE_S = 0.02


class SessionError(UserError):
  """Bad input data. The message is one line naming the session, split and column."""


def dense_to_csr(counts_TxN: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Encodes one trial's counts `[T, N]` as CSR `(data, indices, indptr)` (row-major, like scipy)."""
  rows, cols = np.nonzero(counts_TxN)
  data = counts_TxN[rows, cols]
  indptr = np.zeros(counts_TxN.shape[0] + 1, np.int64)
  np.cumsum(np.bincount(rows, minlength=counts_TxN.shape[0]), out=indptr[1:])
  return data.astype(np.int64), cols.astype(np.int64), indptr


@dataclasses.dataclass(frozen=True)
class Ragged:
  """K variable-length rows stored flat: `values` concatenated, `lengths` [K]. Arrow list columns map onto it."""
  values: np.ndarray
  lengths: np.ndarray

  @classmethod
  def from_lists(cls, rows: Sequence[Sequence]) -> "Ragged":
    lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
    values = np.concatenate([np.asarray(r) for r in rows]) if lengths.sum() else np.zeros(0, np.int64)
    return cls(values, lengths)

  @classmethod
  def from_arrow(cls, column) -> "Ragged":
    """From a pyarrow (chunked) list column, without a Python object per element."""
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return cls(arr.flatten().to_numpy(zero_copy_only=False), arr.value_lengths().to_numpy(zero_copy_only=False))


def csr_to_dense(data: Ragged, indices: Ragged, indptr: Ragged, T: int, N: int, *, where: str = "") -> np.ndarray:
  """Decodes K trials' CSR columns into dense `uint8 [K, T, N]` in one vectorised scatter, validating each piece.

  Args:
    data, indices, indptr: the three per-trial list columns (K rows each).
    T, N: the matrix shape shared by all trials.
    where: "session <eid>, split <name>" for error messages.
  """
  K = len(indptr.lengths)
  bad = np.flatnonzero(indptr.lengths != T + 1)
  if bad.size:
    raise SessionError(f"{where}, column {SPIKES_INDPTR!r}: trial {bad[0]} has length {indptr.lengths[bad[0]]}, "
                       f"expected T+1 = {T + 1}")
  bad = np.flatnonzero(data.lengths != indices.lengths)
  if bad.size:
    raise SessionError(f"{where}, columns {SPIKES_DATA!r}/{SPIKES_INDICES!r}: trial {bad[0]} has "
                       f"{data.lengths[bad[0]]} values but {indices.lengths[bad[0]]} indices")
  nnz_K = data.lengths
  indptr_KxT1 = indptr.values.astype(np.int64).reshape(K, T + 1)
  bad = np.flatnonzero((indptr_KxT1[:, 0] != 0) | (indptr_KxT1[:, -1] != nnz_K)
                       | np.any(np.diff(indptr_KxT1, axis=1) < 0, axis=1))
  if bad.size:
    raise SessionError(f"{where}, column {SPIKES_INDPTR!r}: trial {bad[0]} is not a valid row pointer "
                       f"(must rise from 0 to the number of values, {nnz_K[bad[0]]})")
  values, cols = data.values, indices.values
  starts_K1 = np.concatenate([[0], np.cumsum(nnz_K)])
  trial_of = lambda i: int(np.searchsorted(starts_K1, i, side="right") - 1)
  if values.dtype.kind == "f":  # counts stored as floats: NaN and inf would pass the range check below
    bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
    if bad.size:
      raise SessionError(f"{where}, column {SPIKES_DATA!r}: trial {trial_of(bad[0])} has count {values[bad[0]]}; "
                         f"counts must be whole numbers 0..255")
  bad = np.flatnonzero((values < 0) | (values > 255))
  if bad.size:
    raise SessionError(f"{where}, column {SPIKES_DATA!r}: trial {trial_of(bad[0])} has count "
                       f"{values[bad[0]]}; counts must be 0..255")
  bad = np.flatnonzero((cols < 0) | (cols >= N))
  if bad.size:
    raise SessionError(f"{where}, column {SPIKES_INDICES!r}: trial {trial_of(bad[0])} has neuron "
                       f"index {cols[bad[0]]}, but N = {N}")
  dense = np.zeros((K, T, N), np.uint8)
  counts_per_bin_KxT = np.diff(indptr_KxT1, axis=1)
  # Blocks of trials with ~1M values each: vectorised scatter, temporaries bounded whatever the session size.
  block = max(1, int(2**20 // max(1.0, float(nnz_K.mean()) if K else 1.0)))
  for k0 in range(0, K, block):
    k1 = min(K, k0 + block)
    v0, v1 = starts_K1[k0], starts_K1[k1]
    # Time bin of every value: bin t of trial k holds values indptr[k, t] .. indptr[k, t+1].
    rows = np.repeat(np.tile(np.arange(T, dtype=np.int64), k1 - k0), counts_per_bin_KxT[k0:k1].ravel())
    trial = np.repeat(np.arange(k1 - k0, dtype=np.int64), nnz_K[k0:k1])
    flat = (trial * T + rows) * N + cols[v0:v1]
    out = dense[k0:k1].reshape(-1)
    if np.all(flat[1:] > flat[:-1]):  # canonical CSR (sorted, no duplicates): plain scatter
      out[flat] = values[v0:v1]
    else:  # duplicates sum, as in scipy's CSR semantics
      np.add.at(out, flat, values[v0:v1].astype(np.uint8))
  return dense
