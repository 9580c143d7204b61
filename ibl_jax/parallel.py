"""Devices: multi-host initialisation, the mesh, shardings, and host-local -> global batches.

One `Mesh` over all devices with axes ("data", "fsdp"). The global batch is split over both axes (each
device holds B / n_devices trials); parameters and optimiser state are replicated, or sharded over "fsdp" by
`param_shardings` when that axis is > 1; per-session tables are sharded over all devices. On several hosts every
process builds only its own rows of each global batch and `jax.make_array_from_process_local_data` stitches them
into one global array.
"""

from __future__ import annotations

import logging
import os

import jax
from jax._src import xla_bridge  # backends_are_initialized: no public equivalent
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ibl_jax import hostmem, optim
from ibl_jax.errors import UserError

BATCH_AXES = ("data", "fsdp")


def initialize_distributed(cfg) -> None:
  """Starts JAX's multi-controller runtime when asked or under Slurm; a no-op for one process.

  `cfg` is the config's `distributed` section. On Slurm (`srun`, one task per GPU or per node) JAX reads
  the SLURM_* environment itself; by hand, give coordinator/num_processes/process_id.
  """
  if jax.distributed.is_initialized():
    return
  # A process that dies stops sending heartbeats: after this long the runtime ends every other process
  # (non-zero exit) instead of leaving it blocked in a collective until the allocation runs out.
  timeout = {"heartbeat_timeout_seconds": int(cfg.get("heartbeat_timeout_s") or 100)}
  if cfg.get("coordinator"):
    # Collectives between CPU devices of different processes (tests, CPU clusters); GPUs use NCCL regardless.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes,
                               process_id=cfg.process_id, **timeout)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**timeout)
  logging.info("process %d/%d: %d local devices %s", jax.process_index(), jax.process_count(),
               jax.local_device_count(), [str(d) for d in jax.local_devices()])


def set_cpu_devices(n: int, *, reuse_freed_memory: bool | str = False) -> None:
  """Splits a CPU host into `n` JAX devices, so the batch is sharded over its cores; call before any JAX work
  (once JAX's backends have started, it changes nothing).

  On a CPU this is mostly a cache effect: 8 trials per device run 1.85× faster per step than 16 on one
  (docs/performance.md). It leaves GPU/TPU runs alone, and it yields to an explicit
  `--xla_force_host_platform_device_count` in XLA_FLAGS. `reuse_freed_memory` (`mesh.reuse_freed_memory`: a
  `hostmem.TUNABLES` mode, or false): a command started for steps on a CPU host restarts first with glibc's
  malloc set to reuse freed memory that way (`hostmem`).
  """
  mode = hostmem.mode_of(reuse_freed_memory)
  if mode:
    hostmem.restart_with_tunables(mode)
  if n and n > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    if xla_bridge.backends_are_initialized():  # a caller already ran JAX work (a command's main called in-process)
      return
    jax.config.update("jax_num_cpu_devices", int(n))


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
  """A ("data", "fsdp") mesh; -1 for `data` takes every device left after `fsdp`."""
  n = jax.device_count()
  if data == -1:
    if n % fsdp:
      raise UserError(f"mesh: fsdp={fsdp} does not divide the {n} devices")
    data = n // fsdp
  if data * fsdp != n:
    raise UserError(f"mesh: data={data} × fsdp={fsdp} = {data * fsdp}, but there are {n} devices")
  devices = np.asarray(jax.devices()).reshape(data, fsdp)
  return Mesh(devices, BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (trial) axis split over every mesh axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_shardings(abstract_tree, mesh: Mesh, *, min_size: int = 2**14, session_rows=None):
  """Shardings for parameters / optimiser state: replicated, or FSDP over the "fsdp" axis.

  Rule (on shapes, so it applies to optimiser moments too): a leaf with at least `min_size` elements is
  split over "fsdp" along its largest dimension that the axis divides; anything else is replicated.
  `session_rows` (a bool tree like `abstract_tree`: `optim.session_leaves`, `optim.state_session_rows`) marks
  the per-session tables `[S, ...]`, which grow with the sessions: each is split over every device (both
  axes) along its first dimension after the session axis that they divide (the most major: the rows a step
  all-gathers keep their last axis whole, which XLA:CPU's per-trial gather reads in order; split along the
  last axis, it read them strided, docs/performance.md row 45). On a CPU host the devices share one RAM,
  where replicas are pure waste.
  """
  n = mesh.shape["fsdp"]

  def split(shape, axes, size, dims):  # dims: the candidates, preferred first
    for dim in dims:
      if shape[dim] % size == 0:
        spec = [None] * len(shape)
        spec[dim] = axes
        return NamedSharding(mesh, P(*spec))
    return replicated(mesh)

  def rule(leaf, per_session=False):
    shape = tuple(getattr(leaf, "shape", ()))
    if per_session and mesh.size > 1:
      return split(shape, BATCH_AXES, mesh.size, range(1, len(shape)))
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
      return replicated(mesh)
    return split(shape, "fsdp", n, np.argsort(shape)[::-1])  # the largest first

  if session_rows is None:
    return jax.tree.map(rule, abstract_tree)
  return jax.tree.map(rule, abstract_tree, session_rows)


def state_shardings(abstract_params, tx, mesh: Mesh, mesh_cfg):
  """(parameter shardings, optimiser-state shardings) for `tx` (`optim.Optimizer`) as config.mesh places them:
  FSDP over "fsdp" for large leaves, and per-session tables over all devices unless `mesh.shard_sessions` is
  False."""
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  rows = tx.session_rows if mesh_cfg.get("shard_sessions", True) else None
  min_size = mesh_cfg.get("fsdp_min_size", 2**14)
  return (param_shardings(abstract_params, mesh, min_size=min_size, session_rows=rows),
          param_shardings(abstract_opt, mesh, min_size=min_size,
                          session_rows=optim.state_session_rows(abstract_opt, rows)))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def global_batch_size(batch_size: int, mesh: Mesh) -> int:
  n = mesh.devices.size
  if batch_size % n:
    raise UserError(f"batch size {batch_size} must be a multiple of the {n} devices of the mesh")
  return batch_size
