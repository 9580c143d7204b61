"""Pretrain a model (any family of ibl_jax.models: NDT1, NDT2) with multi-task masking.

  python -m ibl_jax.train --config=configs/ndt1.py
  python -m ibl_jax.train --config=configs/ndt2.py
  python -m ibl_jax.train --config=configs/ndt1.py --config.training.num_steps=200 --config.run_name=quick
  python -m ibl_jax.train --config=configs/ndt1.py:paper --config.data.sessions=/path/to/eids.txt

Writes `results/<run_name>/`: config.json, corpus.json (session order and region vocabulary), tb/
(TensorBoard), metrics.jsonl, checkpoints/ (Orbax: latest K and the best by validation loss), figures/,
summary.json. `training.objective` picks the loss (ibl_jax/objectives.py): masked modelling, or "supervised" (a
decoding head on behaviour, validated and checkpointed by `decode_score`; docs/design.md §13). A run directory that
already holds a checkpoint resumes from it
(`--config.training.resume=False` starts over); SIGTERM (Slurm pre-emption) saves and exits 0.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ibl_jax import checkpoint, cli as cli_lib, losses, masking, metrics, models, monitor, optim, parallel, rundir
from ibl_jax import objectives as objectives_lib
from ibl_jax import steps as steps_lib
from ibl_jax import supervised
from ibl_jax.models import heads
from ibl_jax.data import batches as batches_lib, cache
from ibl_jax.data import sessions as sessions_lib
from ibl_jax.errors import UserError


def run_dir_of(config) -> Path:
  return Path(config.results_dir) / (config.run_name or config.name)


def load_training_corpus(config, *, region_vocab=None) -> sessions_lib.Corpus:
  """The config's sessions; the synthetic corpus is generated first when the default points into it."""
  d = config.data
  spec = d.sessions
  if isinstance(spec, str) and d.synthetic_dir and spec.startswith(str(d.synthetic_dir)) and not Path(spec).exists():
    if jax.process_index() == 0:
      from ibl_jax.data import synthetic  # pylint: disable=g-import-not-at-top
      print(f"generating the synthetic corpus in {d.synthetic_dir} (first use)", file=sys.stderr)
      synthetic.ensure_corpus(d.synthetic_dir, n_sessions=d.synthetic_sessions)
    _barrier("synthetic corpus")
  return sessions_lib.load_corpus(
      spec, region_vocab=region_vocab, progress=jax.process_index() == 0, cache_dir=d.cache_dir,
      array_cache=d.get("array_cache"),
      trial_filter=d.trial_filter, regions=d.regions.split(",") if d.regions else None,
      neuron_order=d.neuron_order, with_true_rates=True)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def _completed_summary(run_dir: Path, step: int, num_steps: int) -> dict | None:
  """The saved summary of a run whose latest checkpoint is at or past `num_steps`, marked as already complete.

  None when the summary was never written (killed between the last save and the summary): the loop then runs
  no step and writes it.
  """
  path = run_dir / "summary.json"
  if not path.exists():
    return None
  summary = json.loads(path.read_text())
  if jax.process_index() == 0:
    print(f"{run_dir} is complete (checkpoint at step {step}, training.num_steps={num_steps}); nothing to train. "
          f"Raise --config.training.num_steps to continue it, or --config.training.resume=False to start over",
          file=sys.stderr)
  return {**summary, "already_complete": True}


def _warn_config_changes(path: Path, config) -> None:
  """A rerun into an existing run directory resumes it: say which fields differ from the saved config."""
  if not path.exists() or not config.training.resume:
    return
  old, new = _flatten(json.loads(path.read_text())), _flatten(json.loads(config.to_json_best_effort()))
  changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k) and not k.startswith(("training.stop_after", "distributed."))]
  if any(c.startswith("training.num_steps:") for c in changed):
    print("note: training.num_steps changed: the learning-rate schedule (warm-up, cosine decay to 0) is defined over "
          "num_steps, so the resumed steps follow the new, longer (or shorter) schedule from the checkpoint's step "
          "on; the rate jumps there if the run had already decayed", file=sys.stderr)
  if changed:
    print(f"warning: {path.parent} exists and will be resumed with a changed config ({'; '.join(changed)}); "
          f"use another --config.run_name or --config.training.resume=False to start over", file=sys.stderr)


class _Preemption:
  """Turns SIGTERM into a flag the loop checks every step."""

  def __init__(self):
    self.requested = False
    try:
      signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. called from a test runner thread): no handler
      pass

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True


class TrainingDiverged(UserError, FloatingPointError):
  """A NaN or inf loss or parameter: one line naming the step and the masking scheme; nothing non-finite saved."""


def _on_process_0(fn):
  """Runs `fn` on process 0; when it raises a `UserError`, every process raises (none is left waiting)."""
  error, result = None, None
  if jax.process_index() == 0:
    try:
      result = fn()
    except UserError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if int(multihost_utils.broadcast_one_to_all(np.int32(error is not None))) and error is None:
      raise UserError("process 0 could not start the run (its error says why)")
  if error is not None:
    raise error
  return result


def train_and_evaluate(config, **kwargs) -> dict:
  """Runs (or resumes) training in a run directory this run alone holds; see `_train_and_evaluate`."""
  parallel.initialize_distributed(config.distributed)
  run_dir = run_dir_of(config)
  rundir.check_writable(run_dir)  # every process writes checkpoint shards; before any compute
  lock = rundir.RunLock(run_dir)
  sigterm_before = signal.getsignal(signal.SIGTERM)  # the loop turns SIGTERM into a save-and-stop flag
  try:
    note = _on_process_0(lock.acquire)
    if note:
      print(f"{run_dir}: {note}", file=sys.stderr)
    return _train_and_evaluate(config, **kwargs)
  finally:
    lock.release()
    try:  # a caller in the same process (a test runner, a notebook) gets its own handler back
      signal.signal(signal.SIGTERM, sigterm_before)
    except ValueError:  # not the main thread: no handler was installed
      pass


def _check_same_data(saved: dict, corpus: sessions_lib.Corpus, run_dir: Path) -> None:
  """A resumed run must see the sessions, neuron counts and regions it was trained on (corpus.json)."""
  where = f"resuming {run_dir} onto changed data"
  fix = "start over with --config.training.resume=False or use another --config.run_name"
  old = dict(zip(saved["eids"], saved["num_neurons"]))
  for i, s in enumerate(corpus.sessions):
    if s.eid not in old:
      raise UserError(f"{where}: session {s.eid} is new (the run was trained on {len(old)} others); {fix}")
    if old[s.eid] != s.num_neurons:
      raise UserError(f"{where}: session {s.eid} has {s.num_neurons} neurons, the run was trained with "
                      f"{old[s.eid]}; {fix}")
    if saved["eids"].index(s.eid) != i:
      raise UserError(f"{where}: session {s.eid} is session {i} now, was {saved['eids'].index(s.eid)}; {fix}")
  missing = [e for e in saved["eids"] if e not in corpus.eids]
  if missing:
    raise UserError(f"{where}: session {missing[0]} is missing ({len(missing)} of {len(old)} sessions); {fix}")
  added = corpus.region_vocab[len(saved["region_vocab"]):]
  if added:
    s = next(s for s in corpus.sessions if added[0] in s.regions)
    raise UserError(f"{where}: session {s.eid} records region {added[0]}, not in the run's region vocabulary; "
                    f"{fix}")


def _train_and_evaluate(config, *, corpus: sessions_lib.Corpus | None = None, init_params=None,
                        trainable=None) -> dict:
  """Runs (or resumes) training; returns the summary that is also written to summary.json.

  Fine-tuning reuses this loop: `corpus` replaces the config's sessions, `init_params(fresh_params)` gives the
  starting parameters of a new run (not of a resumed one), and `trainable(params) -> bool tree` freezes the
  parameters marked False.
  """
  run_dir = run_dir_of(config)
  is_main = jax.process_index() == 0
  if is_main:
    run_dir.mkdir(parents=True, exist_ok=True)
    _warn_config_changes(run_dir / "config.json", config)
    rundir.atomic_write_text(run_dir / "config.json", config.to_json_best_effort(indent=1))
  _barrier("run dir")

  best_metric = config.training.best_metric
  if best_metric not in ("val_loss", *checkpoint.MAXIMISED):
    raise UserError(f"config.training.best_metric={best_metric!r}: choose val_loss or "
                    f"{', '.join(checkpoint.MAXIMISED)}")
  ckpt = checkpoint.Checkpointer(run_dir / "checkpoints", keep=config.training.keep_checkpoints,
                                 best_metric=best_metric)
  resume_step = ckpt.latest_step() if config.training.resume else None
  if not config.training.resume and ckpt.all_steps():
    # Starting over: the old steps would collide with the new run's (and a later resume would mix the two).
    if is_main:
      print(f"training.resume=False: removing the {len(ckpt.all_steps())} old checkpoints in {run_dir}/checkpoints",
            file=sys.stderr)
      for old_step in ckpt.all_steps():
        ckpt.manager.delete(old_step)
    _barrier("start over")
  if resume_step is not None and (resume_step >= config.training.num_steps
                                  or ckpt.restore_meta(resume_step).get("early_stopped")):
    done = _completed_summary(run_dir, resume_step, config.training.num_steps)
    if done is not None:  # a rerun (Slurm requeue, a repeated command) of a finished run: nothing to do
      ckpt.close()
      return done
  saved_corpus = None
  if resume_step is not None and (run_dir / "corpus.json").exists():
    saved_corpus = json.loads((run_dir / "corpus.json").read_text())
  vocab = saved_corpus["region_vocab"] if saved_corpus else None  # keep region ids stable
  if corpus is None:
    corpus = load_training_corpus(config, region_vocab=vocab)
  if saved_corpus:
    _check_same_data(saved_corpus, corpus, run_dir)
  if is_main:
    sessions_lib.save_vocab(corpus, run_dir / "corpus.json")

  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
  B = parallel.global_batch_size(config.data.batch_size, mesh)
  # Sharded init: shapes first, then parameters and optimiser state created directly with their shardings,
  # never as one unsharded copy.
  session_neurons = [s.num_neurons for s in corpus.sessions]
  session_regions = [s.region_ids for s in corpus.sessions]
  def init_fn(log_rate_bias_SxN, shared_log_rate):
    params = steps_lib.split_params(steps_lib.build_model(config.model, num_sessions=len(corpus.sessions),
                                                          n_max=corpus.n_max, session_neurons=session_neurons,
                                                          session_regions=session_regions, seed=config.seed))[1]
    if log_rate_bias_SxN is None:
      return params
    return models.set_log_rate_bias(config.model, params, log_rate_bias_SxN, shared_log_rate)
  graphdef, abstract_params = steps_lib.split_params(nnx.eval_shape(
      lambda: steps_lib.build_model(config.model, num_sessions=len(corpus.sessions), n_max=corpus.n_max,
                                    session_neurons=session_neurons, session_regions=session_regions)))
  tx = optim.make_optimizer(config.training, trainable=trainable(abstract_params) if trainable else None,
                            session_rows=optim.session_leaves(abstract_params, config.model, len(corpus.sessions)))
  reduction = config.training.get("loss_reduction", "mean")
  if reduction not in losses.REDUCTIONS:
    raise UserError(f"config.training.loss_reduction={reduction!r}: choose from {', '.join(losses.REDUCTIONS)}")
  objective = config.training.get("objective", "mtm")
  decode_targets = heads.parse_targets(config.model.get("decode_targets"))
  steps = steps_lib.Steps(graphdef=graphdef, tx=tx, masking_cfg=config.masking, objective=objective,
                          loss_reduction=reduction, decode_targets=decode_targets,
                          decode_prompt=config.training.get("decode_prompt", "neuron"))
  objectives_lib.make(steps.objective, config.masking, reduction, targets=decode_targets,  # fails before compiling
                      prompt=steps.decode_prompt)
  # Only a supervised objective's batches carry behaviours: pretraining batches stay as they were.
  behaviours = decode_targets if objective in objectives_lib.BEHAVIOUR_OBJECTIVES else ()
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  ckpt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((abstract_params, abstract_opt)))
  # LatestN + the best + one being written, and room for logs and figures.
  rundir.check_free_space(run_dir, ckpt_bytes * (config.training.keep_checkpoints + 2) + 64 * 2**20)
  p_shard, o_shard = parallel.state_shardings(abstract_params, tx, mesh, config.mesh)
  rep = parallel.replicated(mesh)
  fns = steps_lib.compiled(steps, param_sharding=p_shard, opt_sharding=o_shard,
                           batch_sharding=parallel.batch_sharding(mesh), replicated=rep)
  base_key = jax.random.key(config.seed)
  train_iter = batches_lib.BatchIterator(corpus, "train", B, seed=config.seed, behaviours=behaviours,
                                         process_index=jax.process_index(), process_count=jax.process_count())
  if resume_step is not None:
    def resumable(meta):
      if "converted_from" in meta:
        raise UserError(f"{run_dir} holds a checkpoint converted from PyTorch, which has no optimiser state to "
                        f"resume; fine-tune from it instead: python -m ibl_jax.finetune --config=configs/finetune.py "
                        f"--config.pretrained={run_dir}")
    # The newest step that restores completely: a damaged newer one is named in a warning and set aside.
    resume_step, params, opt_state, meta = checkpoint.restore_newest(
        ckpt, abstract_params=checkpoint.abstract_with_shardings(abstract_params, p_shard),
        abstract_opt_state=checkpoint.abstract_with_shardings(abstract_opt, o_shard), check_meta=resumable)
    train_iter.restore(meta["data_state"])
    base_key = jax.random.wrap_key_data(jnp.asarray(meta["rng_key_data"], jnp.uint32))
    start_step = int(meta["step"])
    early_stopped = meta.get("early_stopped")  # a rerun of an early-stopped run trains no further
    print(f"resuming {run_dir} from step {start_step}", file=sys.stderr)
  else:
    bias = shared = None
    if config.training.get("init_log_rate_bias", False):  # the same host values on every process
      mean_counts = [s.splits["train"].mean_counts() for s in corpus.sessions]  # cached: no full read
      bias, shared = models.log_rate_bias(mean_counts, corpus.n_max), models.shared_log_rate(mean_counts)
    params = jax.jit(init_fn, out_shardings=p_shard)(bias, shared)
    if init_params is not None:  # fine-tuning: transplanted host values, placed onto the same shardings
      params = jax.device_put(init_params(jax.device_get(params)), p_shard)
    opt_state = jax.jit(tx.init, out_shardings=o_shard)(params)
    start_step, early_stopped = 0, None

  tc = config.training
  mon = monitor.Monitor(run_dir, total_steps=tc.num_steps, start_step=start_step)
  schedule = optim.learning_rate_schedule(tc)
  preempt = _Preemption()
  scheme_names = {i: masking.SCHEMES[i] for i in masking.configured_scheme_ids(config.masking)}
  pending, history = [], []  # device metrics not yet read; (step, loss) read so far
  val, best_val, val_step = {}, {}, None
  sign = 1.0 if checkpoint.best_mode_of(best_metric) == "min" else -1.0  # compare sign·metric: lower is better
  patience = int(tc.get("early_stop_patience", 0) or 0)
  stale = 0  # evaluations since the best one
  t_start, steps_done, step = time.time(), 0, start_step
  t_interval = time.time()

  def kept() -> str:
    """Before stopping on a non-finite value: the save in flight (of finite parameters) completes first."""
    ckpt.wait()
    last = ckpt.latest_step()
    return "no checkpoint was saved" if last is None else f"the checkpoints up to step {last} are finite and kept"

  def save(step_now: int, metrics_now: dict | None, *, force: bool = False):
    # Never a checkpoint of non-finite parameters: a NaN loss names its step and scheme first.
    check_losses(pending)
    if not checkpoint.all_finite(params):
      raise TrainingDiverged(f"parameters hold NaN or inf after step {step_now}; not saved ({kept()}); lower "
                             f"training.learning_rate or check the data")
    ckpt.save(step_now, params=params, opt_state=opt_state, metrics=metrics_now, force=force,
              meta={"step": step_now, "data_state": train_iter.state(), "early_stopped": early_stopped,
                    "rng_key_data": np.asarray(jax.random.key_data(base_key)).tolist()})

  def check_losses(items):
    for (s, _), m in zip(items, jax.device_get([m for _, m in items])):
      loss = float(m["loss"])
      if not math.isfinite(loss):
        raise TrainingDiverged(f"train loss is {loss} at step {s} (masking scheme "
                               f"{masking.SCHEMES[int(m['scheme_id'])]}); {kept()}; lower "
                               f"training.learning_rate or check the data")

  def flush(step_now: int):
    """Reads the metrics of finished steps (after the next step is dispatched) and logs them."""
    nonlocal t_interval
    if not pending:
      return
    check_losses(pending)
    fetched = jax.device_get([m for _, m in pending])
    by_scheme: dict[str, list[float]] = {}
    for (s, _), m in zip(pending, fetched):
      loss = float(m["loss"])
      history.append((s, loss))
      by_scheme.setdefault(masking.SCHEMES[int(m["scheme_id"])], []).append(loss)
    n, dt = len(pending), time.time() - t_interval
    values = {"loss": float(np.mean([float(m["loss"]) for m in fetched])),
              "grad_norm": float(np.mean([float(m["grad_norm"]) for m in fetched])),
              "lr": float(schedule(step_now)), "steps_per_s": n / dt, "trials_per_s": n * B / dt,
              **({f"loss/{k}": float(np.mean(v)) for k, v in by_scheme.items()} if not behaviours else {})}
    mon.scalars(step_now, values)
    mon.progress(step_now, f"loss {values['loss']:.4f}  {values['steps_per_s']:.2f} steps/s")
    pending.clear()
    t_interval = time.time()

  while step < tc.num_steps and not early_stopped:
    batch = parallel.global_batch(next(train_iter), mesh)
    params, opt_state, m = fns["train_step"](params, opt_state, batch, jnp.int32(step), base_key)
    step += 1
    steps_done += 1
    pending.append((step, m))
    last = step == tc.num_steps
    stop = preempt.requested or (tc.get("stop_after") and step >= tc.stop_after)
    if step % tc.log_every == 0 or last or stop:
      flush(step)
    if step % tc.eval_every == 0 or last:
      if behaviours:
        val = validate_decoding(fns, params, corpus, mesh, B, mon, step, decode_targets)
      else:
        val = validate(fns, params, corpus, config, mesh, B, mon, step, scheme_names)
      val_step = step
      t_interval = time.time()  # throughput counts training steps only
      improved = not best_val or sign * val[best_metric] < sign * best_val[best_metric]
      best_val, stale = (dict(val, step=step), 0) if improved else (best_val, stale + 1)
      if patience and stale >= patience and not last:
        early_stopped = step
        print(f"early stopping at step {step}: {best_metric} has not improved for {stale} evaluations (best "
              f"{best_val[best_metric]:.4f} at step {best_val['step']})", file=sys.stderr)
    if step % tc.checkpoint_every == 0 or last or stop or early_stopped:
      scores = {k: val[k] for k in ("val_loss", *checkpoint.MAXIMISED) if k in val}
      save(step, scores if val_step == step else None, force=True)
    if early_stopped:
      break
    if stop and not last:
      print(f"stopping at step {step} ({'SIGTERM' if preempt.requested else 'stop_after'}); checkpoint saved, "
            f"rerun the same command to resume", file=sys.stderr)
      break
  flush(step)
  ckpt.close()
  wall = time.time() - t_start
  compilations = fns["train_step"]._cache_size()  # pylint: disable=protected-access
  summary = {"run_dir": str(run_dir), "steps": step, "start_step": start_step,
             "completed": step >= tc.num_steps or bool(early_stopped), "early_stopped_at": early_stopped,
             "best_metric": best_metric,
             "wall_time_s": wall, "devices": jax.device_count(), "processes": jax.process_count(),
             "batch_size": B, "steps_per_s": steps_done / wall, "trials_per_s": steps_done * B / wall,
             "train_step_compilations": compilations,
             "final_train_loss": float(np.mean([l for _, l in history[-tc.log_every:]])) if history else None,
             "final_val": val, "best_val": best_val}
  mon.scalars(step, {"train_step_compilations": compilations}, kind="compile")
  mon.close()
  if is_main:
    rundir.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
  return summary


def validate(fns, params, corpus, config, mesh, B, mon, step, scheme_names) -> dict:
  """Validation loss per scheme (fixed masks) and a quick co-smoothing bits/spike on a few neuron slots."""
  tc = config.training
  val_batches = [parallel.global_batch(b, mesh) for b in batches_lib.sequential_batches(
      corpus, "val", B, max_batches=tc.eval_batches, **_process_rows())]
  out = {}
  for scheme_id, name in scheme_names.items():
    total = count = 0.0
    for i, batch in enumerate(val_batches):
      s, c = jax.device_get(fns["eval_loss"](params, batch, jnp.int32(scheme_id),
                                              jax.random.fold_in(jax.random.key(12345), i)))
      total, count = total + float(s), count + float(c)
    out[f"val_loss/{name}"] = total / max(count, 1.0)
  out["val_loss"] = float(np.mean([out[f"val_loss/{n}"] for n in scheme_names.values()]))

  # Quick co-smoothing: a few neuron slots present in every session, predicted with that neuron held out.
  n_min = min(s.num_neurons for s in corpus.sessions)
  slots = np.unique(np.linspace(0, n_min - 1, min(tc.quick_cosmooth_neurons, n_min)).astype(int))
  pred_MxTxJ = np.concatenate([
      np.stack([np.asarray(jax.device_get(fns["heldout_rates"](params, batch, jnp.int32(j)))) for j in slots], -1)
      for batch in val_batches])
  pairs = batches_lib.trial_index(corpus, "val")[:len(pred_MxTxJ)]
  bps, oracle = [], []
  for s_idx in np.unique(pairs[:, 0]):
    rows = np.flatnonzero(pairs[:, 0] == s_idx)
    split = corpus.sessions[s_idx].splits["val"]
    spikes = cache.take_trials(split.spikes, pairs[rows, 1])[:, :, slots].astype(np.float32)
    bps.append(metrics.bits_per_spike(pred_MxTxJ[rows], spikes))
    if split.true_rates is not None:
      oracle.append(metrics.bits_per_spike(cache.take_trials(split.true_rates, pairs[rows, 1])[:, :, slots], spikes))
  out["cosmooth_bps"] = float(np.nanmean(np.concatenate(bps)))
  if oracle:
    out["cosmooth_bps_oracle"] = float(np.nanmean(np.concatenate(oracle)))
  mon.scalars(step, out, kind="val")
  first = corpus.sessions[int(pairs[0, 0])]
  rows = np.flatnonzero(pairs[:, 0] == pairs[0, 0])
  show = np.arange(min(4, len(slots)))
  truth = first.splits["val"].true_rates
  mon.figure(step, "val/heldout_rates", monitor.rates_figure(
      pred_MxTxJ[rows][:, :, show], cache.take_trials(first.splits["val"].spikes, pairs[rows, 1])[:, :, slots[show]].astype(float),
      None if truth is None else cache.take_trials(truth, pairs[rows, 1])[:, :, slots[show]],
      [f"{first.eid[:8]} neuron {j} ({first.regions[j]})" for j in slots[show]]))
  return out


def validate_decoding(fns, params, corpus, mesh, B, mon, step, targets) -> dict:
  """Supervised objective: the loss and the decoding metrics (ibl_jax/supervised.py) on every validation trial."""
  val_batches = [parallel.global_batch(b, mesh)
                 for b in batches_lib.sequential_batches(corpus, "val", B, behaviours=targets, **_process_rows())]
  sums = counts = 0.0
  for batch in val_batches:
    s, c = jax.device_get(fns["eval_loss"](params, batch, jnp.int32(0), jax.random.key(0)))
    sums, counts = sums + np.asarray(s, np.float64), counts + np.asarray(c, np.float64)
  out = {"val_loss": float(np.sum(sums / np.maximum(counts, 1.0)))}
  out.update(supervised.scores(*supervised.gather(fns["decode"], params, val_batches, targets), targets))
  mon.scalars(step, out, kind="val")
  return out


def _process_rows() -> dict[str, int]:
  """This process's share of every global validation batch: it reads only those trials."""
  return {"process_index": jax.process_index(), "process_count": jax.process_count()}


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  cli_lib.quiet_logs(cli_lib.absl_verbosity())
  cli_lib.split_cpu(config.mesh)
  summary, status = cli_lib.run_guarded(train_and_evaluate, config)
  if status:
    sys.exit(status)
  if jax.process_index() == 0:
    print(done_line(summary))


def done_line(summary: dict) -> str:
  """The one-line result of a run (a value that was never measured, e.g. after a requeue, reads n/a)."""
  v = summary.get("final_val") or {}
  fmt = lambda x, spec: "n/a" if x is None or not math.isfinite(x) else format(x, spec)
  head = (f"already complete: {summary['steps']} steps" if summary.get("already_complete") else
          f"done: {summary['steps']} steps in {summary['wall_time_s']:.0f}s")
  return (f"{head}; final train loss {fmt(summary.get('final_train_loss'), '.4f')}; val loss "
          f"{fmt(v.get('val_loss'), '.4f')}; co-smoothing {fmt(v.get('cosmooth_bps'), '.3f')} bits/spike (oracle "
          f"{fmt(v.get('cosmooth_bps_oracle'), '.3f')}); results in {summary['run_dir']}")


def cli():
  from absl import app  # pylint: disable=g-import-not-at-top
  from ibl_jax import configs  # pylint: disable=g-import-not-at-top
  configs.define_config_flag("configs/ndt1.py", "Training configuration: a configs/*.py file, or the name of a "
                             "shipped one (ndt1, ndt1:paper, ndt1_temporal).")
  app.run(main)


if __name__ == "__main__":
  cli()
