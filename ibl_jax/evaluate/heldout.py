"""Held-out batching: every (trial, variant) input of a task through one compiled forward, in fixed chunks."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from ibl_jax import models, parallel
from ibl_jax.evaluate.tasks import EvalError, LeaveOut

CPU_CHUNK_PER_DEVICE = 32  # docs/performance.md: on a CPU larger chunks fall out of cache (1.4x slower at 128)
# and at most this much forward activation a CPU device (the family's count): NDT2 at paper size (36.9 MB a row)
# ran 1.6x (bf16) and 1.25x (fp32) faster at 2 rows a device than at 32 (docs/performance.md, row 49).
CPU_ACTIVATION_BYTES = 2**27
MAX_CHUNK_PER_DEVICE = 4096

# -------------------------------------------------------------------------------------- batched forwards


def auto_chunk_size(model_cfg, num_bins: int, n_max: int, devices: Sequence[jax.Device]) -> int:
  """The chunk for `eval.chunk_size = 0`: whole shards per device, as large as memory allows on accelerators.

  The largest power of two per device whose forward activations, per row as the model family counts them
  (`activation_bytes_per_row`), fit: on a CPU `CPU_ACTIVATION_BYTES`, at most `CPU_CHUNK_PER_DEVICE` rows (NDT1:
  32 at both sizes; NDT2 at paper size 2); on accelerators a quarter of the device's memory, at most
  `MAX_CHUNK_PER_DEVICE` rows (NDT1 at paper size on an 80 GB H100: 3.6 MB a row -> 4096).
  """
  n = len(devices)
  row_bytes = models.of(model_cfg).activation_bytes_per_row(model_cfg, num_bins, n_max)
  limit = (devices[0].memory_stats() or {}).get("bytes_limit") if devices[0].platform != "cpu" else None
  budget, most = (limit // 4, MAX_CHUNK_PER_DEVICE) if limit else (CPU_ACTIVATION_BYTES, CPU_CHUNK_PER_DEVICE)
  per_device = 2 ** int(math.log2(max(1, min(most, budget // row_bytes))))
  return per_device * n


def chunk_plan(num_trials: int, num_variants: int, chunk_size: int) -> tuple[int, int]:
  """(G trials per group, m variants per chunk) for K trials × V variants in chunks of B rows.

  A chunk's row b runs trial b % G of the current group with variant c·m + b // G, so m·G ≤ B rows are used.
  The plan minimises chunks + 2 × groups (a group moves a chunk-sized buffer each way; on an H100 that costs
  about two paper-size chunks): for K = 200, V = 700, B = 256 it takes G = 51, m = 5: 4 groups, 560 chunks (one group
  of 200 trials: 700; the floor ⌈K·V / B⌉ is 547).
  """
  best = None
  for G in range(min(num_trials, chunk_size), 0, -1):  # ties go to the larger group
    m = min(chunk_size // G, num_variants)
    groups = -(-num_trials // G)
    cost = groups * -(-num_variants // m) + 2 * groups
    if best is None or cost < best[0]:
      best = (cost, G, m)
  return best[1], best[2]


def _rows(B, slot_valid_B, group_size, per_chunk, num_variants, chunk):
  """Each row's variant v_B (clamped to a real one) and whether the row counts (`_chunk_step`)."""
  b_B = jnp.arange(B)
  v_B = chunk * per_chunk + b_B // group_size
  valid_B = slot_valid_B & (b_B < per_chunk * group_size) & (v_B < num_variants)
  return jnp.minimum(v_B, num_variants - 1), valid_B  # invalid rows still run a real input (then count for nothing)


def _chunk_step(fn, state, out_BxTxN, spikes_BxTxN, trial_idx_B, slot_valid_B, keep_T, keep_VxN, target_VxN,
                session_idx, prompt_idx, causal, group_size, per_chunk, num_variants, chunk):
  """One chunk of leave-one-out forwards on device; adds each row's target predictions to its slot in `out`.

  Row b holds trial b % G of the group (`spikes_BxTxN[b]`, repeated m times down the rows) and runs variant
  v = chunk·m + b // G. Rows past m·G, variants past V and padded trials add nothing. Variants' targets are
  disjoint, so a slot accumulates exact values (x + 0 = x) and the m slots of a trial sum to its predictions.
  """
  B, T, _ = spikes_BxTxN.shape
  v_B, valid_B = _rows(B, slot_valid_B, group_size, per_chunk, num_variants, chunk)
  inputs_BxTxN = spikes_BxTxN.astype(jnp.float32) * keep_T[None, :, None] * keep_VxN[v_B][:, None, :]
  log_rates_BxTxN = fn(state, inputs_BxTxN, jnp.ones((B, T), bool), jnp.full((B,), session_idx, jnp.int32),
                       trial_idx_B, prompt_idx, causal).astype(jnp.float32)
  scored_BxTxN = (target_VxN[v_B] & valid_B[:, None])[:, None, :]
  return out_BxTxN + jnp.where(scored_BxTxN, log_rates_BxTxN, 0.0)


def _prefix_chunk_step(fn, state, out_BxTxN, spikes_BxTxN, prefix_BxTxE, neuron_prefix_NxE, trial_idx_B,
                       slot_valid_B, keep_T, drop_V, target_VxN, session_idx, prompt_idx, causal, group_size,
                       per_chunk, num_variants, chunk):
  """`_chunk_step` for variants that each zero at most one neuron (drop_V[v], -1 for none), for a model whose
  input is affine up to its first non-linearity (`Predict.prefix`): a row's pre-activation is its trial's,
  computed once per group (`prefix_BxTxE`, from the counts with keep_T applied), less the dropped neuron's
  counts times its direction (`neuron_prefix_NxE`). Same outputs as `_chunk_step` up to rounding; the stitch-in
  and embedding matmuls (10–14 % of an NDT1 forward) run once per trial instead of once per variant."""
  B, T, N = spikes_BxTxN.shape
  v_B, valid_B = _rows(B, slot_valid_B, group_size, per_chunk, num_variants, chunk)
  drop_B = drop_V[v_B]
  column_BxT = jnp.take_along_axis(spikes_BxTxN, jnp.maximum(drop_B, 0)[:, None, None], axis=2)[:, :, 0]
  dropped_BxT = jnp.where(drop_B[:, None] >= 0, column_BxT.astype(jnp.float32) * keep_T[None, :], 0.0)
  direction_BxE = neuron_prefix_NxE[jnp.maximum(drop_B, 0)]
  prefix_BxTxE = prefix_BxTxE.astype(jnp.float32) - dropped_BxT[:, :, None] * direction_BxE[:, None, :]
  shape_only_BxTxN = spikes_BxTxN.astype(jnp.float32)  # the model reads only its shape (and XLA drops it)
  log_rates_BxTxN = fn(state, shape_only_BxTxN, jnp.ones((B, T), bool), jnp.full((B,), session_idx, jnp.int32),
                       trial_idx_B, prompt_idx, causal, prefix_BxTxE=prefix_BxTxE).astype(jnp.float32)
  scored_BxTxN = (target_VxN[v_B] & valid_B[:, None])[:, None, :]
  return out_BxTxN + jnp.where(scored_BxTxN, log_rates_BxTxN, 0.0)


def _group_prefix(prefix, state, spikes_BxTxN, keep_T, session_idx):
  """The pre-activation of a group's trials with keep_T applied (`_prefix_chunk_step`), float32."""
  B = spikes_BxTxN.shape[0]
  kept_BxTxN = spikes_BxTxN.astype(jnp.float32) * keep_T[None, :, None]
  return prefix(state, kept_BxTxN, jnp.full((B,), session_idx, jnp.int32)).astype(jnp.float32)


def _sum_slots(out_BxTxN, group_size):
  """Row g of the result is the sum of the slots b with b % G = g (rows ≥ G are zero)."""
  return jnp.zeros_like(out_BxTxN).at[jnp.arange(out_BxTxN.shape[0]) % group_size].add(out_BxTxN)


@dataclasses.dataclass(frozen=True)
class Predict:
  """A traceable forward and its state, placed on a mesh; `make_predict` builds one, `heldout_log_rates` runs it.

  fn(state, inputs_BxTxN float32, time_mask_BxT bool, session_idx_B int32, trial_idx_B int32, prompt_idx int32,
     causal bool) -> log_rates_BxTxN. N is n_max (inputs zero-padded). trial_idx numbers trials in SPLIT_ORDER,
  so a stub can look its truths up in `state`; a model ignores it. `step` is the one jitted chunk step
  (`step._cache_size()` counts its compilations: one per T, n_max and chunk size).

  Optional, for a model affine in its inputs up to a first non-linearity (NDT1): prefix(state, inputs_BxTxN,
  session_idx_B) -> its pre-activation [B, T, E]; neuron_prefix(state, session_idx) -> [N, E], each neuron's
  direction in it; and fn then takes `prefix_BxTxE=` in place of computing it. Leave-one-out variants then
  cost one prefix per trial (`_prefix_chunk_step`, jitted as `prefix_step`).
  """
  fn: Callable
  state: Any
  mesh: jax.sharding.Mesh
  step: Callable
  sum_slots: Callable
  zeros: Callable
  prefix: Callable | None = None
  neuron_prefix: Callable | None = None
  prefix_step: Callable | None = None

  def on_mesh(self, x, sharded: bool = False) -> jax.Array:
    """A host array, identical on every process, as a global array (split over the trials or replicated)."""
    x = np.asarray(x)
    sharding = parallel.batch_sharding(self.mesh) if sharded else parallel.replicated(self.mesh)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def make_predict(fn: Callable, state: Any, mesh: jax.sharding.Mesh | None = None, *, prefix: Callable | None = None,
                 neuron_prefix: Callable | None = None) -> Predict:
  """A `Predict` whose chunks are split over the devices of `mesh` (default all); `state` is replicated."""
  mesh = mesh or parallel.make_mesh()
  batch, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  step = jax.jit(functools.partial(_chunk_step, fn), donate_argnums=1,
                 in_shardings=(rep, batch, batch, batch, batch) + (rep,) * 10, out_shardings=batch)
  sum_slots = jax.jit(_sum_slots, in_shardings=(batch, rep), out_shardings=rep)
  zeros = jax.jit(lambda x: jnp.zeros(x.shape, jnp.float32), in_shardings=batch, out_shardings=batch)
  prefix_step = None
  if prefix is not None:
    prefix = jax.jit(functools.partial(_group_prefix, prefix), in_shardings=(rep, batch, rep, rep),
                     out_shardings=batch)
    neuron_prefix = jax.jit(neuron_prefix, in_shardings=(rep, rep), out_shardings=rep)
    prefix_step = jax.jit(functools.partial(_prefix_chunk_step, fn), donate_argnums=1,
                          in_shardings=(rep, batch, batch, batch, rep, batch, batch) + (rep,) * 10,
                          out_shardings=batch)
  predict = Predict(fn, None, mesh, step, sum_slots, zeros, prefix, neuron_prefix, prefix_step)
  return dataclasses.replace(predict, state=jax.tree.map(predict.on_mesh, state))


def model_predict(graphdef, params, mesh: jax.sharding.Mesh | None = None) -> Predict:
  """The `Predict` of a model (any family) given as (graphdef, params): deterministic, one compilation per input
  shape. The model is called through the family contract (ibl_jax/models/__init__.py); a model with
  `input_prefix` and `neuron_prefix` (NDT1) also gets the one-prefix-per-trial leave-one-out path."""

  def forward(params, inputs_BxTxN, time_mask_BxT, session_idx_B, trial_idx_B, prompt_idx, causal, prefix_BxTxE=None):
    del trial_idx_B  # a model sees only its inputs
    model = nnx.merge(graphdef, params)
    extra = {} if prefix_BxTxE is None else {"prefix_BxTxE": prefix_BxTxE}
    return model(inputs_BxTxN, time_mask_BxT, session_idx_B, prompt_idx, causal, deterministic=True, **extra)

  model = nnx.merge(graphdef, params)
  if not (hasattr(model, "input_prefix") and hasattr(model, "neuron_prefix")):
    return make_predict(forward, params, mesh)
  return make_predict(forward, params, mesh,
                      prefix=lambda p, x, s: nnx.merge(graphdef, p).input_prefix(x, s),
                      neuron_prefix=lambda p, s: nnx.merge(graphdef, p).neuron_prefix(s))


def heldout_log_rates(predict: Predict, spec: LeaveOut, spikes_KxTxN: np.ndarray, *, session_idx: int,
                      trial_idx_K: np.ndarray, n_max: int, chunk_size: int, desc: str = "",
                      progress: bool = False) -> np.ndarray:
  """Runs every (trial, variant) input of `spec` on device in fixed-shape chunks; returns log-rates [K, T, N].

  Entry (k, t, n) is the prediction of the variant that targets neuron n, on trial k. Per group of trials the
  host sends the counts once (uint8) and reads the predictions once; a chunk sends nothing but its index.
  """
  K, T, N = spikes_KxTxN.shape
  V, B = spec.keep_VxN.shape[0], chunk_size
  if N > n_max:
    raise EvalError(f"the session has {N} neurons, more than the model's n_max = {n_max}")
  if B % predict.mesh.devices.size:
    raise EvalError(f"chunk size {B} is not a multiple of the {predict.mesh.devices.size} devices")
  assert (spec.target_VxN.sum(0) == 1).all(), "every neuron must be the target of exactly one variant"
  G, m = chunk_plan(K, V, B)
  pad_VxN = lambda x: np.pad(x.astype(bool), ((0, n_max - V), (0, n_max - N)))  # V ≤ N ≤ n_max
  on_mesh = predict.on_mesh
  consts = (on_mesh(spec.keep_T.astype(np.float32)), on_mesh(pad_VxN(spec.keep_VxN).astype(np.float32)),
            on_mesh(pad_VxN(spec.target_VxN)), on_mesh(np.int32(session_idx)), on_mesh(np.int32(spec.prompt_idx)),
            on_mesh(np.bool_(spec.causal)), on_mesh(np.int32(G)), on_mesh(np.int32(m)), on_mesh(np.int32(V)))
  chunk_idx = [on_mesh(np.int32(c)) for c in range(-(-V // m))]
  out_KxTxN = np.zeros((K, T, N), np.float32)
  bar = tqdm(total=-(-K // G) * len(chunk_idx), desc=desc, unit="chunk", disable=not progress, leave=False)

  def collect(rows, summed_BxTxN):
    out_KxTxN[rows] = np.asarray(summed_BxTxN[:len(rows), :, :N])

  group_size = consts[6]
  drops_V = (~spec.keep_VxN.astype(bool)).sum(1)
  use_prefix = predict.prefix_step is not None and bool((drops_V <= 1).all())
  if use_prefix:  # one stitch-in and embedding per trial, corrected per variant (co-smoothing: per neuron)
    drop_V = np.where(drops_V == 1, np.argmin(spec.keep_VxN.astype(bool), axis=1), -1)
    keep_T = consts[0]
    consts = (on_mesh(np.pad(drop_V, (0, n_max - V), constant_values=-1).astype(np.int32)), *consts[2:])
    neuron_prefix_NxE = predict.neuron_prefix(predict.state, on_mesh(np.int32(session_idx)))
  pending = None
  for g0 in range(0, K, G):
    rows = np.arange(g0, min(g0 + G, K))
    slot_B = rows[np.arange(B) % G % len(rows)]  # slots of padded trials repeat a real trial
    spikes_BxTxN = np.zeros((B, T, n_max), spikes_KxTxN.dtype)
    spikes_BxTxN[:, :, :N] = spikes_KxTxN[slot_B]
    group = (on_mesh(spikes_BxTxN, True), on_mesh(trial_idx_K[slot_B].astype(np.int32), True),
             on_mesh(np.arange(B) % G < len(rows), True))
    out_BxTxN = predict.zeros(group[0])
    if use_prefix:
      prefix_BxTxE = predict.prefix(predict.state, group[0], keep_T, consts[2])
    for c in chunk_idx:
      if use_prefix:
        out_BxTxN = predict.prefix_step(predict.state, out_BxTxN, group[0], prefix_BxTxE, neuron_prefix_NxE,
                                        *group[1:], keep_T, *consts, c)
      else:
        out_BxTxN = predict.step(predict.state, out_BxTxN, *group, *consts, c)
      bar.update()
    if pending is not None:  # read the previous group only now, so the device works while the host reads
      collect(*pending)
    summed_BxTxN = predict.sum_slots(out_BxTxN, group_size)
    if predict.mesh.devices.size > 1:
      # sum_slots is the one program here with a collective (an all-reduce). On a CPU split into devices the
      # next group's independent programs could otherwise start beside it and starve one device's part of it:
      # 3 of 4 `evaluate` runs on 2 CPU devices stopped at XLA's rendezvous timeout.
      summed_BxTxN.block_until_ready()
    pending = (rows, summed_BxTxN)
  collect(*pending)
  bar.close()
  return out_KxTxN
