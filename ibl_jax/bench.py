"""Throughput benchmarks: the train step, co-smoothing evaluation, the data pipeline, a per-trial reference.

  python -m ibl_jax.bench                                        # small default model: train, eval, data
  python -m ibl_jax.bench --config=configs/ndt1.py:paper --dtype=bf16 --sizes=16,64
  python -m ibl_jax.bench --what=train,reference --out=bench.json
  python -m ibl_jax.bench --config.model.num_layers=2            # any config field can be overridden
  python -m ibl_jax.bench --config.mesh.cpu_devices=1             # a CPU host as one device (default: 2)
  python -m ibl_jax.bench --what=train,eval --compare=configs/ndt2.py   # NDT1 and NDT2, interleaved
  python -m ibl_jax.bench --what=train --profile=prof/           # + a trace and the top ops a step

Inputs are synthetic and built in memory (no disk): `--sessions` sessions whose neuron counts spread from 60%
of `--neurons` to `--neurons` (N_max; default the config's `bench.neurons`: 668 at paper size, as the paper's
stitching width), T = 100 bins, spikes drawn by `ibl_jax.data.synthetic` (about 13% non-zero bins, as IBL recordings at 20 ms), MtM masking,
batches mixing sessions. What each benchmark measures:

  train      the jitted, sharded, donated train step of `ibl_jax.steps` on device-resident batches: compile
             seconds, step time (p10/median/p90 over `--steps` steps after 2 warm-up steps, each ended by
             `block_until_ready`), the process's CPU time per step (a shared host inflates wall time, not
             this), trials/s, tokens/s (time bins; the two prefix tokens are not counted), model FLOPs and
             achieved FLOP/s, MFU on accelerators with a known peak, peak memory (per device); then `loop`:
             the training loop's pattern (BatchIterator -> host->device -> step, no sync inside), trials/s.
  eval       co-smoothing leave-one-out (docs/design.md §7) through `evaluate.evaluate_session`: one forward per
             (trial, held-out neuron), `chunk` of them per compiled call; forwards/s, held-out neurons/s and
             the seconds for one session of N neurons x K trials (on a CPU projected from the first
             `--eval_max_chunks` chunks' worth of trials). The inputs are built on device from the session's
             counts (`evaluate.heldout_log_rates`): a chunk moves no data between host and device.
  data       BatchIterator + host->device transfer alone, trials/s: it must far exceed training's.
  reference  the same model's train step in plain form: one trial per optimiser step, `jax.jit` on one
             device without shardings, a Python loop; its trials/s (and trials per CPU-second) against the
             batched, sharded step's at the first batch size.
  torch      ours against a PyTorch NDT1 or NDT2 with the same weights (`ibl_jax.bench_torch`): train step and
             co-smoothing forwards at each batch size, interleaved; the ratio ours / PyTorch (float32).

FLOPs count matmuls only (the model family's `flops_per_trial`, 2*m*n*k each): a training step is 3x the forward
(the backward pass is two matmuls per forward matmul), over every row of the batch. MFU divides achieved FLOP/s
by the chip's dense peak for the compute dtype (`PEAK_TFLOPS`); float32 matmuls on NVIDIA Ampere and later run
as TF32 under JAX's default precision, so float32 is held against the TF32 peak unless
`jax_default_matmul_precision` is "highest". CPUs have no entry: no MFU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ibl_jax import configs, hostmem, models, op_profile, optim, parallel, steps as steps_lib
from ibl_jax.data import batches as batches_lib
from ibl_jax.data import sessions as sessions_lib
from ibl_jax.data import synthetic
from ibl_jax.errors import UserError
from ibl_jax import cli as cli_lib

WHATS = ("train", "eval", "data", "reference", "torch")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "float32": "float32", "bfloat16": "bfloat16"}

# Dense peak TFLOP/s per chip (no sparsity), matched by substring of `device.device_kind`, first match wins.
PEAK_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0, "tf32": 378.0, "float32": 51.0}),
    ("H100 NVL", {"bfloat16": 835.0, "tf32": 418.0, "float32": 60.0}),
    ("H100", {"bfloat16": 989.0, "tf32": 495.0, "float32": 67.0}),  # SXM
    ("H200", {"bfloat16": 989.0, "tf32": 495.0, "float32": 67.0}),  # also GH200
    ("A100", {"bfloat16": 312.0, "tf32": 156.0, "float32": 19.5}),
    ("L40S", {"bfloat16": 362.0, "tf32": 183.0, "float32": 91.6}),
    ("TPU v4", {"bfloat16": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0}),
    ("TPU v5", {"bfloat16": 459.0}),  # v5p
    ("TPU v6 lite", {"bfloat16": 918.0}),
)


def peak_flops(device_kind: str, dtype: str) -> tuple[float | None, str]:
  """(peak FLOP/s, basis) of one chip for matmuls in `dtype`; (None, "") when unknown (e.g. CPUs)."""
  for pattern, peaks in PEAK_TFLOPS:
    if pattern in device_kind:
      basis = dtype
      if dtype == "float32" and "tf32" in peaks and jax.config.jax_default_matmul_precision not in (
          "highest", "float32"):
        basis = "tf32"
      return (peaks[basis] * 1e12, f"{pattern} {basis} dense") if basis in peaks else (None, "")
  return None, ""


def train_flops_per_step(model_cfg, batch_size: int, T: int, n_max: int) -> int:
  """Model FLOPs of one train step: 3 x forward (forward + backward's two matmuls per matmul) x batch."""
  return 3 * batch_size * models.of(model_cfg).flops_per_trial(model_cfg, T, n_max)


# --------------------------------------------------------------------------------------------- inputs


def synthetic_corpus(num_sessions: int, n_max: int, trials_per_session: int, seed: int = 0
                     ) -> sessions_lib.Corpus:
  """An in-memory corpus: neuron counts from 0.6 * n_max up to n_max, every region, the synthetic generator."""
  brain = synthetic.make_brain(seed)
  counts = np.linspace(0.6 * n_max, n_max, num_sessions).round().astype(int) if num_sessions > 1 else [n_max]
  sessions = []
  for i, n in enumerate(counts):
    sim = synthetic.simulate_session(brain, eid=f"bench-{i}", n_neurons=int(n), regions=synthetic.REGIONS,
                                     n_trials=trials_per_session, seed=seed * 1000 + i)
    splits = {name: sessions_lib.Split(spikes=sim["counts_KxTxN"][idx], behaviour={})
              for name, idx in sim["splits"].items()}
    sessions.append(sessions_lib.Session(eid=sim["eid"], source="memory", splits=splits, regions=sim["regions"],
                                         depths=sim["depths"], uuids=sim["uuids"]))
  vocab = list(synthetic.REGIONS)
  for i, s in enumerate(sessions):
    s.session_idx = i
    s.region_ids = np.array([vocab.index(r) for r in s.regions.tolist()], np.int32)
  return sessions_lib.Corpus(sessions=sessions, region_vocab=vocab)


# --------------------------------------------------------------------------------------------- helpers


def cudnn_attention_calls(hlo_text: str) -> int:
  """cuDNN fused-attention kernels in a compiled step (its custom calls are named `__cudnn$fmha...`); 0 off GPUs."""
  return len(re.findall(r'custom_call_target="__cudnn\$fmha', hlo_text))


# CPU instruction sets that decide CPU figures (docs/performance.md: bf16 pays only with AMX; the attention
# kernel is built for the widest vectors), as /proc/cpuinfo names them and as the report prints them.
CPU_ISAS = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2"),
            ("asimd", "NEON"))


def host_cpu(cpuinfo: str) -> dict[str, Any]:
  """The CPU's model name and its instruction sets of `CPU_ISAS`, from the text of /proc/cpuinfo."""
  fields: dict[str, str] = {}
  for line in cpuinfo.splitlines():  # the first processor's (each lists its own)
    if ":" in line:
      key, value = line.split(":", 1)
      fields.setdefault(key.strip(), value.strip())
  flags = set((fields.get("flags") or fields.get("Features") or "").split())
  return {"model": fields.get("model name", ""), "isa": [name for flag, name in CPU_ISAS if flag in flags]}


def _read_host_cpu() -> dict[str, Any]:
  try:
    return host_cpu(Path("/proc/cpuinfo").read_text())
  except OSError:  # not Linux
    return {"model": "", "isa": []}


def _percentiles_ms(seconds: list[float]) -> dict[str, float]:
  p10, p50, p90 = np.percentile(np.asarray(seconds) * 1e3, [10, 50, 90])
  return {"step_ms_p10": float(p10), "step_ms_median": float(p50), "step_ms_p90": float(p90)}


def peak_memory_bytes() -> tuple[int, str]:
  """Peak memory so far: the first device's allocator peak when it reports one, else the process's host RSS."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device"
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "host_rss"  # Linux: KiB


def _cost(compiled) -> dict[str, float]:
  """XLA's FLOPs (all ops, not only matmuls) and buffer bytes of one device's program: a cross-check."""
  out = {}
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if cost and "flops" in cost:
    out["xla_flops"] = float(cost["flops"])
  mem = compiled.memory_analysis()
  if mem is not None:
    out["xla_buffer_bytes"] = int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                  + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  return out


@dataclasses.dataclass
class Bench:
  """One model and corpus on one mesh; each method runs one benchmark and returns a flat dict."""
  config: Any
  corpus: sessions_lib.Corpus
  mesh: Any
  steps: steps_lib.Steps
  params_host: Any

  @classmethod
  def create(cls, config, corpus) -> "Bench":
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    model = steps_lib.build_model(config.model, num_sessions=len(corpus.sessions), n_max=corpus.n_max,
                                  session_neurons=[s.num_neurons for s in corpus.sessions],
                                  session_regions=[s.region_ids for s in corpus.sessions], seed=config.seed)
    graphdef, params = steps_lib.split_params(model)
    params_host = jax.tree.map(np.asarray, params)  # numpy: each device_put below makes fresh (donatable) buffers
    rows = optim.session_leaves(params, config.model, len(corpus.sessions))
    steps = steps_lib.Steps(graphdef=graphdef, tx=optim.make_optimizer(config.training, session_rows=rows),
                            masking_cfg=config.masking, objective=config.training.get("objective", "mtm"))
    return cls(config, corpus, mesh, steps, params_host)

  @property
  def T(self) -> int:
    return self.corpus.num_bins

  def _shardings(self):
    p_shard, o_shard = parallel.state_shardings(self.params_host, self.steps.tx, self.mesh, self.config.mesh)
    return p_shard, o_shard, parallel.batch_sharding(self.mesh), parallel.replicated(self.mesh)

  def _init_state(self, p_shard, o_shard):
    params = jax.device_put(self.params_host, p_shard)
    return params, jax.jit(self.steps.tx.init, out_shardings=o_shard)(params)

  def train(self, batch_size: int, *, steps: int, warmup: int = 2, profile_dir: str | None = None) -> dict:
    """Compile time, per-step time on device-resident batches, FLOPs, memory; then the loop's trials/s.
    With `profile_dir`, the timed steps run under a profiler trace and the result lists their top ops."""
    p_shard, o_shard, b_shard, rep = self._shardings()
    fns = steps_lib.compiled(self.steps, param_sharding=p_shard, opt_sharding=o_shard, batch_sharding=b_shard,
                             replicated=rep)
    train_step = fns["train_step"]
    params, opt_state = self._init_state(p_shard, o_shard)
    it = batches_lib.BatchIterator(self.corpus, "train", batch_size, seed=0)
    batches = [parallel.global_batch(next(it), self.mesh) for _ in range(4)]  # distinct sessions and masks
    key = jax.random.key(0)

    t0 = time.perf_counter()
    compiled = train_step.lower(params, opt_state, batches[0], jnp.int32(0), key).compile()
    compile_s = time.perf_counter() - t0  # the jit cache now holds it: the calls below do not recompile

    times, cpu_times = [], []
    profile_to = Path(profile_dir) / f"{self.config.name}_train_b{batch_size}" if profile_dir else None
    with op_profile.trace(profile_to) if profile_to else contextlib.nullcontext():
      for i in range(warmup + steps):
        step_i = jnp.int32(i)  # as the training loop passes it (another argument type would recompile)
        t0, c0 = time.perf_counter(), time.process_time()
        params, opt_state, m = train_step(params, opt_state, batches[i % len(batches)], step_i, key)
        jax.block_until_ready((params, opt_state, m))
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    if not math.isfinite(float(m["loss"])):
      raise FloatingPointError(f"bench: train loss is {float(m['loss'])} at batch {batch_size}")
    times, cpu_times = times[warmup:], cpu_times[warmup:]

    # The training loop's pattern: build the next host batch while the previous step runs, no sync inside.
    t0 = time.perf_counter()
    for i in range(steps):
      batch = parallel.global_batch(next(it), self.mesh)
      params, opt_state, m = train_step(params, opt_state, batch, jnp.int32(i), key)
    jax.block_until_ready((params, opt_state, m))
    loop_s = time.perf_counter() - t0

    median_s = float(np.median(times))
    flops = train_flops_per_step(self.config.model, batch_size, self.T, self.corpus.n_max)
    kind = jax.devices()[0].device_kind
    peak, basis = peak_flops(kind, self.config.model.dtype)
    achieved = flops / median_s
    mem, mem_kind = peak_memory_bytes()
    return {
        "batch": batch_size, "compile_s": compile_s, **_percentiles_ms(times), "timed_steps": len(times),
        "trials_per_s": batch_size / median_s, "tokens_per_s": batch_size * self.T / median_s,
        "flops_per_step": flops, "flops_per_s": achieved,
        "mfu": achieved / (peak * jax.device_count()) if peak else None, "mfu_basis": basis or None,
        "host_cpu_ms_median": float(np.median(cpu_times)) * 1e3,
        "peak_memory_bytes": mem, "peak_memory_kind": mem_kind,
        "loop_trials_per_s": steps * batch_size / loop_s,
        "compilations": train_step._cache_size(),  # pylint: disable=protected-access
        "cudnn_attention_calls": cudnn_attention_calls(compiled.as_text()),
        **{f"{k}_per_device": v for k, v in _cost(compiled).items()},
        **({"profile_dir": str(profile_to),
            "top_ops": op_profile.describe(op_profile.top_ops(op_profile.trace_events(profile_to), warmup + steps),
                                           compiled.as_text())}
           if profile_to else {}),
    }

  def eval(self, *, chunk: int, trials: int, max_chunks: int | None = None) -> dict:
    """Co-smoothing of the largest session (N neurons x `trials` K): `evaluate.evaluate_session` end to end.

    With `max_chunks`, at most that many chunks' worth of trials are run (at least one trial) and the K-trial
    session's time is projected linearly: every chunk has the same shape and cost.
    """
    from ibl_jax import evaluate  # pylint: disable=g-import-not-at-top  (imports sklearn)
    session = max(self.corpus.sessions, key=lambda s: s.num_neurons)
    if chunk <= 0:  # eval.chunk_size = 0: as evaluation picks it
      chunk = evaluate.auto_chunk_size(self.config.model, self.T, self.corpus.n_max, jax.devices())
    N, n_max, T = session.num_neurons, self.corpus.n_max, self.T
    k_run = trials if max_chunks is None else min(trials, max(1, max_chunks * chunk // N))
    test = session.splits["test"].spikes
    spikes_KxTxN = np.resize(test, (k_run,) + test.shape[1:])  # cycle the test trials
    predict = evaluate.model_predict(self.steps.graphdef, self.params_host)

    def cosmooth(spikes, n):  # evaluate.py on the first n neurons of these trials
      part = dataclasses.replace(session, regions=session.regions[:n], depths=session.depths[:n],
                                 uuids=session.uuids[:n], region_ids=session.region_ids[:n],
                                 splits={"test": sessions_lib.Split(spikes=spikes[:, :, :n], behaviour={})})
      evaluate.evaluate_session(predict, part, session.session_idx, n_max, "co_smooth", None, chunk_size=chunk,
                                figures=False, progress=False)

    t0 = time.perf_counter()
    cosmooth(spikes_KxTxN[:1], min(N, chunk))  # one chunk: compiles, and warms evaluate.py's host path
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cosmooth(spikes_KxTxN, N)
    run_s = time.perf_counter() - t0
    step = predict.prefix_step or predict.step  # co-smoothing takes the prefix path where the model has one
    compilations = step._cache_size()  # pylint: disable=protected-access
    if compilations != 1:
      raise RuntimeError(f"bench: evaluate.py compiled its forward {compilations} times")
    forwards = k_run * N
    session_s = run_s * trials / k_run
    return {"chunk": chunk, "neurons": N, "trials": trials, "trials_run": k_run, "chunks_run": -(-forwards // chunk),
            "first_chunk_s": first_s,  # compilation + one chunk
            "session_s": session_s, "session_s_projected": k_run < trials,
            "heldout_neurons_per_s": N / session_s, "forwards_per_s": forwards / run_s,
            "flops_per_s": forwards * models.of(self.config.model).flops_per_trial(self.config.model, T, n_max)
                           / run_s}

  def data(self, batch_size: int, *, steps: int) -> dict:
    """BatchIterator + host->device transfer, trials/s (host assembly alone as well)."""
    it = batches_lib.BatchIterator(self.corpus, "train", batch_size, seed=1)
    jax.block_until_ready(parallel.global_batch(next(it), self.mesh))
    n = max(steps, 20)
    t0 = time.perf_counter()
    for _ in range(n):
      next(it)
    host_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n):
      jax.block_until_ready(parallel.global_batch(next(it), self.mesh))
    total_s = time.perf_counter() - t0
    return {"batch": batch_size, "trials_per_s": n * batch_size / total_s,
            "host_trials_per_s": n * batch_size / host_s,
            "batch_mb": sum(v.nbytes for v in next(it).values()) / 2**20}

  def reference(self, *, steps: int, warmup: int = 2) -> dict:
    """The plain form: one trial per optimiser step, `jax.jit` on one device without shardings, a Python loop."""
    step_fn = jax.jit(self.steps.train_step, donate_argnums=(0, 1))
    device = jax.devices()[0]
    params = jax.device_put(self.params_host, device)
    # Committed like the step's outputs: an uncommitted first input would cost a second compilation.
    opt_state = jax.device_put(jax.jit(self.steps.tx.init)(params), device)
    it = batches_lib.BatchIterator(self.corpus, "train", 1, seed=2)
    key = jax.random.key(0)
    times, cpu_times = [], []
    for i in range(warmup + steps):
      t0, c0 = time.perf_counter(), time.process_time()
      params, opt_state, m = step_fn(params, opt_state, next(it), np.int32(i), key)
      jax.block_until_ready((params, opt_state, m))
      times.append(time.perf_counter() - t0)
      cpu_times.append(time.process_time() - c0)
    median_s = float(np.median(times[warmup:]))
    return {"batch": 1, **_percentiles_ms(times[warmup:]), "trials_per_s": 1.0 / median_s,
            "host_cpu_ms_median": float(np.median(cpu_times[warmup:])) * 1e3,
            "compilations": step_fn._cache_size()}  # pylint: disable=protected-access


def run(config, *, what=("train", "eval", "data"), sizes=(16,), steps: int = 20, sessions: int = 4,
        neurons: int | None = None, eval_trials: int = 100, eval_chunk: int | None = None,
        eval_max_chunks: int | None = None, rounds: int = 3, profile_dir: str | None = None,
        log: Callable[[str], None] = lambda s: None) -> dict:
  """Runs the benchmarks `what` and returns one JSON-able dict (see the module docstring)."""
  return compare([config], what=what, sizes=sizes, steps=steps, sessions=sessions, neurons=neurons,
                 eval_trials=eval_trials, eval_chunk=eval_chunk, eval_max_chunks=eval_max_chunks, rounds=rounds,
                 profile_dir=profile_dir, log=log)[0]


def compare(config_list, *, what=("train", "eval", "data"), sizes=(16,), steps: int = 20, sessions: int = 4,
            neurons: int | None = None, eval_trials: int = 100, eval_chunk: int | None = None,
            eval_max_chunks: int | None = None, rounds: int = 3, profile_dir: str | None = None,
            log: Callable[[str], None] = lambda s: None) -> list[dict]:
  """`run` for several configs (e.g. NDT1 and NDT2) in one process, interleaved: each benchmark runs for every
  config before the next benchmark starts, so a shared host's load drifts over all of them alike."""
  if jax.process_count() > 1:
    raise UserError("the benchmark runs in one process (it may use every local device)")
  unknown = sorted(set(what) - set(WHATS))
  if unknown:
    raise UserError(f"unknown benchmark(s) {unknown}; choose from {', '.join(WHATS)}")
  if rounds < 1:
    raise UserError(f"--rounds={rounds}: at least 1")
  n_dev = jax.device_count()
  bad = [b for b in sizes if b % n_dev]
  if bad:
    raise UserError(f"batch sizes {bad} are not multiples of the {n_dev} devices")
  setups = [_setup(c, sizes=sizes, sessions=sessions, neurons=neurons, log=log) for c in config_list]
  dev = jax.devices()[0]
  if eval_max_chunks is None and dev.platform == "cpu":
    eval_max_chunks = 4  # a whole session takes minutes (small model) to half an hour (paper) on a CPU
  for w in what:
    for out, bench in setups:
      tag = f"{bench.config.name}: " if len(setups) > 1 else ""
      if w == "train":
        out["train"] = []
        for b in sizes:
          log(f"{tag}train: batch {b} ...")
          out["train"].append(bench.train(b, steps=steps, profile_dir=profile_dir))
        out.update({k: out["train"][0][k] for k in ("trials_per_s", "step_ms_median", "compile_s",
                                                    "flops_per_step")})
      elif w == "eval":
        log(f"{tag}eval: co-smoothing ...")
        out["eval"] = bench.eval(chunk=eval_chunk or bench.config.eval.chunk_size, trials=eval_trials,
                                 max_chunks=eval_max_chunks)
      elif w == "data":
        log(f"{tag}data: BatchIterator + host->device ...")
        out["data"] = bench.data(sizes[0], steps=steps)
      elif w == "reference":
        log(f"{tag}reference: one trial per step ...")
        out["reference"] = bench.reference(steps=max(steps, 20))
      elif w == "torch":
        from ibl_jax import bench_torch  # pylint: disable=g-import-not-at-top
        log(f"{tag}torch: ours and the PyTorch model, interleaved ...")
        out["torch"] = bench_torch.compare(bench.config, bench.corpus, sizes=sizes, steps=min(steps, 5),
                                           rounds=rounds, log=log)
  for out, _ in setups:
    if "reference" in out and "train" in out:
      t, ref = out["train"][0], out["reference"]
      ref["batched_over_reference"] = t["trials_per_s"] / ref["trials_per_s"]
      ref["batched_over_reference_cpu"] = ref["host_cpu_ms_median"] / (t["host_cpu_ms_median"] / t["batch"])
  return [out for out, _ in setups]


def _setup(config, *, sizes, sessions: int, neurons: int | None, log) -> tuple[dict, Bench]:
  """The corpus, model and the static part of the results of one config."""
  n_max = neurons or config.get("bench", {}).get("neurons") or 160
  # Enough train trials (70% of each session) for the largest batch without repeats in the first epoch.
  trials = max(64, math.ceil(1.5 * max(sizes) / (0.7 * sessions)))
  t0 = time.perf_counter()
  corpus = synthetic_corpus(sessions, n_max, trials)
  log(f"corpus: {sessions} sessions x {trials} trials, N_max {n_max} ({time.perf_counter() - t0:.1f}s)")
  bench = Bench.create(config, corpus)
  dev = jax.devices()[0]
  family = models.of(config.model)
  out = {
      "device": {"kind": dev.device_kind, "platform": dev.platform, "count": jax.device_count(),
                 "processes": jax.process_count(), "host_cpus": os.cpu_count(),
                 "host_load_avg": os.getloadavg()[0],  # other work on a shared host inflates wall times
                 "host_cpu": _read_host_cpu(),
                 "xla_flags": os.environ.get("XLA_FLAGS", ""),
                 "malloc_reuses_freed_memory": hostmem.active_mode(),  # ibl_jax/hostmem.py (a mode, or None)
                 "compilation_cache": jax.config.jax_compilation_cache_dir},  # if set, compile_s may be a hit
      "config": config.name, "dtype": config.model.dtype,
      "model": {k: config.model[k] for k in ("name", *family.ARCHITECTURE) if k in config.model},
      "params": models.param_count(bench.params_host),
      "corpus": {"sessions": sessions, "n_max": n_max, "T": corpus.num_bins,
                 "neurons": [s.num_neurons for s in corpus.sessions], "trials_per_session": trials,
                 "nonzero_fraction": float(np.mean([(s.splits["train"].spikes > 0).mean()
                                                    for s in corpus.sessions]))},
      "masking": config.masking.scheme,
      "flops_per_trial": family.flops_per_trial(config.model, corpus.num_bins, n_max),
  }
  return out, bench


def format_comparison(results: list[dict]) -> str:
  """One line per config: the figures to read side by side."""
  head = ("config", "params", "FLOP/trial", "compile s", "train trials/s", "eval forwards/s", "eval 1st chunk s")
  rows = [(r["config"], _si(r["params"]), _si(r["flops_per_trial"]),
           f"{r['compile_s']:.1f}" if "compile_s" in r else "-",
           f"{r['trials_per_s']:.1f}" if "trials_per_s" in r else "-",
           f"{r['eval']['forwards_per_s']:.0f}" if "eval" in r else "-",
           f"{r['eval']['first_chunk_s']:.1f}" if "eval" in r else "-") for r in results]
  widths = [max(len(x) for x in col) for col in zip(head, *rows)]
  return "\n".join("  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in (head, *rows))


def _si(x: float | None, unit: str = "") -> str:
  if x is None:
    return "-"
  for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= factor:
      return f"{x / factor:.3g} {prefix}{unit}"
  return f"{x:.3g} {unit}".rstrip()


def format_report(r: dict) -> str:
  """The results as a plain-text table."""
  d, c = r["device"], r["corpus"]
  cpu = d.get("host_cpu") or {}
  host = f"; host {cpu['model'] or 'CPU'}: {', '.join(cpu['isa']) or 'no vector ISA listed'}" if cpu else ""
  lines = [f"device {d['kind']} x{d['count']} ({d['platform']}, {d['processes']} process{host})  config {r['config']}  "
           f"dtype {r['dtype']}  params {_si(r['params'])}",
           f"corpus {c['sessions']} sessions, neurons {c['neurons']}, N_max {c['n_max']}, T {c['T']}, "
           f"{c['nonzero_fraction']:.1%} non-zero; masking {r['masking']}; "
           f"{_si(r['flops_per_trial'], 'FLOP')} forward per trial"]
  if "train" in r:
    head = ("batch", "compile s", "step ms p10/med/p90", "CPU ms", "trials/s", "tokens/s", "FLOP/step", "FLOP/s",
            "MFU", "peak mem", "loop trials/s")
    rows = [(str(t["batch"]), f"{t['compile_s']:.1f}",
             f"{t['step_ms_p10']:.1f}/{t['step_ms_median']:.1f}/{t['step_ms_p90']:.1f}",
             f"{t['host_cpu_ms_median']:.0f}", f"{t['trials_per_s']:.1f}", _si(t["tokens_per_s"]),
             _si(t["flops_per_step"]), _si(t["flops_per_s"]), "-" if t["mfu"] is None else f"{t['mfu']:.1%}",
             f"{_si(t['peak_memory_bytes'], 'B')} {t['peak_memory_kind']}", f"{t['loop_trials_per_s']:.1f}")
            for t in r["train"]]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines += ["", "train"] + ["  " + "  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in (head, *rows)]
    for t in r["train"]:
      if t.get("top_ops"):
        lines += ["", f"top ops, batch {t['batch']} (ms a step, summed over devices; trace in {t['profile_dir']})",
                  op_profile.format_top_ops(t["top_ops"])]
    if d["platform"] == "gpu":
      calls = ", ".join(str(t.get("cudnn_attention_calls", 0)) for t in r["train"])
      lines.append(f"  cuDNN fused-attention calls in the compiled train step (per batch size): {calls}")
  if "eval" in r:
    e = r["eval"]
    run = f"projected from {e['trials_run']} trial(s)" if e["session_s_projected"] else "measured"
    lines += ["", f"eval (co-smoothing, evaluate.py)  chunk {e['chunk']}: {e['forwards_per_s']:.0f} forwards/s, "
              f"{_si(e['flops_per_s'], 'FLOP/s')}; one session of {e['neurons']} neurons x {e['trials']} trials "
              f"{e['session_s']:.1f} s ({run}), {e['heldout_neurons_per_s']:.2f} held-out neurons/s; "
              f"first chunk (with compilation) {e['first_chunk_s']:.1f} s"]
  if "data" in r:
    a = r["data"]
    ratio = f", {a['trials_per_s'] / r['train'][0]['trials_per_s']:.0f}x training's" if "train" in r else ""
    lines += ["", f"data  batch {a['batch']}: {a['trials_per_s']:.0f} trials/s with host->device "
              f"(host only {a['host_trials_per_s']:.0f}){ratio}; {a['batch_mb']:.1f} MB per batch"]
  if "reference" in r:
    f = r["reference"]
    vs = (f"; the batched step (batch {r['train'][0]['batch']}) does {f['batched_over_reference']:.2f}x its "
          f"trials/s, {f['batched_over_reference_cpu']:.2f}x its trials per CPU-second"
          if "batched_over_reference" in f else "")
    lines += ["", f"reference (1 trial/step, plain jit, 1 device)  {f['step_ms_median']:.1f} ms/trial "
              f"({f['host_cpu_ms_median']:.1f} CPU-ms), {f['trials_per_s']:.1f} trials/s{vs}"]
  if "torch" in r:
    from ibl_jax import bench_torch  # pylint: disable=g-import-not-at-top
    lines += ["", bench_torch.format_table(r["torch"])]
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI


def _config_arg(path: str) -> tuple[str, str | None]:
  """"configs/ndt2.py:paper" -> ("ndt2", "paper")."""
  file, _, arg = path.strip().partition(":")
  return Path(file).stem, arg or None


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  cli_lib.quiet_logs(cli_lib.absl_verbosity())  # no INFO lines (e.g. "Unable to initialize backend 'tpu'")
  F = flags.FLAGS
  config = F.config
  if F.profile and op_profile.XLA_FLAG not in os.environ.get("XLA_FLAGS", ""):  # before JAX starts its CPU client
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {op_profile.XLA_FLAG}".strip()
  # as training does; before any device is touched
  cli_lib.split_cpu(config.mesh)
  if F.dtype:
    config.model.dtype = DTYPES[F.dtype]
  what = [w.strip() for w in F.what.split(",") if w.strip()]
  sizes = [int(s) for s in F.sizes.split(",")] if F.sizes else [F.batch or config.data.batch_size]
  try:
    others = [configs.get_config(*_config_arg(path)) for path in F.compare.split(",") if path.strip()]
    for other in others:
      other.mesh.cpu_devices = config.mesh.get("cpu_devices", 0)
      if F.dtype:
        other.model.dtype = DTYPES[F.dtype]
    results = compare([config, *others], what=what, sizes=sizes, steps=F.steps, sessions=F.sessions,
                      neurons=F.neurons, eval_trials=F.eval_trials, eval_chunk=F.eval_chunk,
                      eval_max_chunks=F.eval_max_chunks, rounds=F.rounds, profile_dir=F.profile,
                      log=lambda s: print(s, file=sys.stderr, flush=True))
  except UserError as e:  # bad flags (unknown benchmark, batch not a multiple of the devices, ...)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if F.out:
    with open(F.out, "w") as f:
      json.dump(results[0] if len(results) == 1 else results, f, indent=1)
  print("\n\n".join(format_report(r) for r in results))
  if len(results) > 1:
    print("\n" + format_comparison(results))
  if F.out:
    print(f"wrote {F.out}")


def cli():
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ibl_jax import configs  # pylint: disable=g-import-not-at-top
  configs.define_config_flag("configs/ndt1.py", "Model/masking configuration (a configs/*.py file or a shipped "
                             "one's name, e.g. configs/ndt1.py:paper or ndt1:paper); fields can be overridden with "
                             "--config.x=y.", lock_config=False)
  flags.DEFINE_string("what", "train,eval,data", f"Comma-separated benchmarks: {', '.join(WHATS)}.")
  flags.DEFINE_string("compare", "", "Comma-separated further configs (e.g. configs/ndt2.py or "
                      "configs/ndt2.py:paper) benchmarked in the same process, interleaved with --config; "
                      "--config.x=y overrides apply to --config only.")
  flags.DEFINE_integer("batch", None, "Global batch size (default: the config's data.batch_size).")
  flags.DEFINE_string("sizes", None, "Comma-separated batch sizes to sweep, e.g. 16,64,256 (overrides --batch).")
  flags.DEFINE_enum("dtype", None, list(DTYPES), "Compute dtype (parameters stay float32); default: the "
                    "config's model.dtype.")
  flags.DEFINE_integer("steps", 20, "Timed steps per batch size, after 2 warm-up steps.")
  flags.DEFINE_integer("rounds", 3, "--what=torch: alternations of ours and PyTorch; the ratio is the median's. "
                       "On a noisy host more rounds steady it (the table gives the rounds' range).")
  flags.DEFINE_integer("sessions", 4, "Synthetic sessions (stitching rows).")
  flags.DEFINE_integer("neurons", None, "N_max; sessions have 0.6 N_max .. N_max neurons (default the config's "
                       "bench.neurons, else 160).")
  flags.DEFINE_integer("eval_trials", 100, "K: test trials of the co-smoothing session.")
  flags.DEFINE_integer("eval_chunk", None, "Leave-one-out forwards per compiled call (default: eval.chunk_size; "
                       "0: automatic, as evaluation).")
  flags.DEFINE_integer("eval_max_chunks", None, "Run at most this many chunks' worth of trials (at least one "
                       "trial) and project the K-trial session's time from them (default: 4 on CPU, the whole "
                       "session on accelerators).")
  flags.DEFINE_string("out", None, "Write the results as JSON here.")
  flags.DEFINE_string("profile", None, "Trace the timed train steps into this directory (TensorBoard's profile "
                      "plugin or Perfetto read it) and list the ops with the most time a step.")
  app.run(main)


if __name__ == "__main__":
  cli()
