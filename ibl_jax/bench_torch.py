"""Ours against PyTorch on the same machine: the same NDT1 or NDT2, weights, batches and dtype, interleaved.

`python -m ibl_jax.bench --what=torch` runs `compare`. The PyTorch side is `ibl_jax.torch_ndt1` (or `torch_ndt2`)
loaded with our weights through the export, checked equal in outputs before any timing. `model.dtype=bfloat16` compares bf16
compute (fp32 parameters) on both sides: ours as training runs it, PyTorch under CPU autocast. Two measurements per batch size,
alternating ours and theirs `rounds` times (`--rounds`) so that a shared host's load hits both alike; the ratio is
the median's, and each round's own ratio is kept (`*_ratio_rounds`; the table gives their range):

  train  one optimiser step (neuron masking, AdamW, Poisson NLL averaged over the masked entries, clipping, the
         config's dropout) on a batch: ours is the jitted train step of `ibl_jax.steps` (masking inside the
         step), theirs masking as the original does in its forward (`torch_ndt1.mask_neurons`), forward,
         backward and `torch.optim.AdamW` in `train()` mode; trials/s.
  eval   co-smoothing forwards: ours as `evaluate` runs them (`heldout_log_rates`: B trials of one session x 16
         leave-one-out variants in chunks of B rows; NDT1 computes its stitch-in and embedding once per trial and
         corrects them per held-out neuron), theirs as the original does, full forwards of [B, T, N] inputs with
         one neuron zeroed under `torch.inference_mode()`; forwards/s. Our plain forward of the same batch is
         reported too (`ours_plain_forwards_per_s`).

The ratio is ours ÷ PyTorch in throughput: above 1 we are faster. Both use every core of the host (PyTorch's
intra-op threads = the CPU count).
"""

from __future__ import annotations

import contextlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ibl_jax import evaluate, optim, parallel, steps as steps_lib
from ibl_jax.data import batches as batches_lib
from ibl_jax.errors import UserError


COSMOOTH_VARIANTS = 16  # leave-one-out variants per trial in the eval timing (a real session has N of them)


def _cosmooth_spec(num_neurons: int, num_bins: int):
  """Co-smoothing's leave-one-out for the first `COSMOOTH_VARIANTS` neurons (variant v zeroes neuron v; the
  last variant also scores the neurons no variant zeroes, as every neuron must be some variant's target)."""
  V = min(COSMOOTH_VARIANTS, num_neurons)
  zeroed_VxN = np.eye(num_neurons, dtype=bool)[:V]
  target_VxN = zeroed_VxN.copy()
  target_VxN[-1, V:] = True
  all_T = np.ones(num_bins, bool)
  return evaluate.LeaveOut(evaluate.PROMPT["neuron"], False, ~zeroed_VxN, target_VxN, all_T, all_T)


def _median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def compare(config, corpus, *, sizes, steps: int = 5, rounds: int = 3, log=print) -> dict:
  """Interleaved train-step and eval-forward throughput of ours and the PyTorch model; returns a JSON dict."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from ibl_jax import convert, torch_ndt1, torch_ndt2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"--what=torch needs PyTorch ({e}): pip install -r requirements-convert.txt") from None
  if config.model.dtype not in ("float32", "bfloat16"):
    raise UserError(f"--what=torch compares float32 or bfloat16, not model.dtype={config.model.dtype!r}")
  # bfloat16 compute with float32 parameters on both sides: ours casts inside each layer (model.dtype), PyTorch
  # runs under CPU autocast (matmuls in bf16; norms, softmax and the loss in fp32), as a PyTorch user would.
  bf16 = config.model.dtype == "bfloat16"
  autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
  torch.set_num_threads(os.cpu_count() or 1)
  model_cfg = config.model
  num_neurons = [s.num_neurons for s in corpus.sessions]
  session_regions = [s.region_ids for s in corpus.sessions]
  model = steps_lib.build_model(model_cfg, num_sessions=len(num_neurons), n_max=corpus.n_max,
                                session_neurons=num_neurons, session_regions=session_regions, seed=0)
  graphdef, params = steps_lib.split_params(model)
  params = jax.tree.map(lambda x: np.array(x, copy=True), params)  # writable host copies
  state_dict = convert.params_to_torch_state_dict(params, model_cfg, num_neurons)
  if model_cfg.name == "ndt1":
    for i, n in enumerate(num_neurons):  # padded neurons carry nothing: the export drops them
      params["stitch_in"]["kernel"][i, n:] = 0
    theirs = torch_ndt1.from_state_dict(state_dict, model_cfg, num_neurons, corpus.n_max)
  elif model_cfg.name == "ndt2":
    theirs = torch_ndt2.from_state_dict(state_dict, model_cfg, num_neurons, corpus.n_max,
                                        session_regions=session_regions, params=params)
  else:
    raise UserError(f"--what=torch has PyTorch models of ndt1 and ndt2, not {model_cfg.name!r}")
  tc = config.training
  masking_cfg = config.masking.copy_and_resolve_references()
  masking_cfg.scheme = "neuron"
  rows = optim.session_leaves(params, model_cfg, len(num_neurons))
  ours_steps = steps_lib.Steps(graphdef=graphdef, tx=optim.make_optimizer(tc, session_rows=rows),
                               masking_cfg=masking_cfg)
  # Ours as training runs it: sharded over every device of the mesh (a CPU host split into mesh.cpu_devices).
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
  p_shard, o_shard = parallel.state_shardings(params, ours_steps.tx, mesh, config.mesh)
  b_shard, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  train_step = steps_lib.compiled(ours_steps, param_sharding=p_shard, opt_sharding=o_shard, batch_sharding=b_shard,
                                  replicated=rep)["train_step"]
  # Evaluation's forward as `evaluate` runs it: parameters replicated, trials split over the devices.
  forward = jax.jit(lambda p, x, tm, s: ours_steps.forward(p, x, {"time_mask": tm, "session_idx": s}, 0, False),
                    in_shardings=(rep, b_shard, b_shard, b_shard), out_shardings=b_shard)
  predict = evaluate.model_predict(graphdef, params, mesh)
  torch_opt = torch.optim.AdamW(theirs.parameters(), lr=tc.learning_rate, eps=tc.adam_eps,
                                weight_decay=tc.weight_decay)
  results = {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads(), "dtype": model_cfg.dtype,
             "jax_devices": jax.device_count(), "sizes": {}}
  for B in sizes:
    batch = next(batches_lib.BatchIterator(corpus, "train", B, seed=0))
    key = jax.random.key(0)
    spikes = torch.from_numpy(np.asarray(batch["spikes"], np.float32))
    time_mask = torch.from_numpy(np.asarray(batch["time_mask"]))
    session = torch.from_numpy(np.asarray(batch["session_idx"])).long()
    dev_batch = parallel.global_batch(batch, mesh)

    with torch.inference_mode(), autocast():  # equal outputs before any timing
      got = theirs(spikes, time_mask, session, 0, False).float().numpy()
    expected = np.asarray(forward(params, dev_batch["spikes"].astype(jnp.float32), dev_batch["time_mask"],
                                  dev_batch["session_idx"]))
    real = np.arange(corpus.n_max)[None, None, :] < np.asarray([num_neurons[s] for s in batch["session_idx"]]
                                                                )[:, None, None]
    max_diff = float(np.abs(np.where(real, got - expected, 0.0)).max())

    state = {"params": jax.device_put(params, p_shard), "opt": None, "step": 0}
    state["opt"] = jax.jit(ours_steps.tx.init, out_shardings=o_shard)(state["params"])

    def ours_train():
      for _ in range(steps):
        state["params"], state["opt"], m = train_step(state["params"], state["opt"], dev_batch,
                                                      jnp.int32(state["step"]), key)
        state["step"] += 1
      jax.block_until_ready(m["loss"])

    def theirs_train():
      theirs.train()  # dropout on, as in our train step
      for _ in range(steps):
        torch_opt.zero_grad(set_to_none=True)
        # The original masks inside its forward in training: a step's masking is part of its cost, as in ours.
        inputs, targets = torch_ndt1.mask_neurons(spikes, masking_cfg.ratio, masking_cfg.zero_ratio,
                                                  masking_cfg.random_ratio)
        with autocast():
          log_rates = theirs(inputs, time_mask, session, 0, False).float()
        nll = torch.where(targets, torch.exp(log_rates) - spikes * log_rates, 0.0).sum() / targets.sum().clamp(min=1)
        nll.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), tc.grad_clip_norm)
        torch_opt.step()

    eval_params = jax.device_put(params, rep)
    x_dev = jax.jit(lambda s: s.astype(jnp.float32).at[:, :, 0].set(0.0), out_shardings=b_shard)(dev_batch["spikes"])

    def ours_forward():
      for _ in range(steps):
        out = forward(eval_params, x_dev, dev_batch["time_mask"], dev_batch["session_idx"])
      jax.block_until_ready(out)

    # Co-smoothing as `evaluate` runs it: B trials of one session, `COSMOOTH_VARIANTS` leave-one-out variants
    # each, chunks of B rows; a model family with an input prefix (NDT1) computes it once per trial.
    loo_spikes = corpus.sessions[0].splits["train"].spikes[:B]
    loo_spec = _cosmooth_spec(corpus.sessions[0].num_neurons, loo_spikes.shape[1])
    loo_forwards = loo_spikes.shape[0] * loo_spec.keep_VxN.shape[0]

    def ours_eval():
      evaluate.heldout_log_rates(predict, loo_spec, loo_spikes, session_idx=0, trial_idx_K=np.arange(len(loo_spikes)),
                                 n_max=corpus.n_max, chunk_size=B)

    x_torch = spikes.clone()
    x_torch[:, :, 0] = 0

    def theirs_eval():
      theirs.eval()
      with torch.inference_mode(), autocast():
        for _ in range(steps):
          theirs(x_torch, time_mask, session, 0, False)

    t_compile = time.perf_counter()
    ours_train()  # compiles
    ours_forward()
    ours_eval()
    compile_s = time.perf_counter() - t_compile
    arms = (("ours_train", ours_train), ("theirs_train", theirs_train), ("ours_forward", ours_forward),
            ("ours_eval", ours_eval), ("theirs_eval", theirs_eval))
    for _, fn in arms:  # one untimed round in the timed order: both sides' heaps reach their steady state
      fn()
    times = {name: [] for name, _ in arms}
    per_call = {"ours_eval": loo_forwards / B}  # seconds per B forwards, as the others
    for _ in range(rounds):
      for name, fn in arms:
        times[name].append(_median_time(fn, 1) / per_call.get(name, steps))
    per = {k: float(np.median(v)) for k, v in times.items()}
    # Each round's own ratio: their spread is what the host's noise did to this comparison.
    rounds_train = [t / o for o, t in zip(times["ours_train"], times["theirs_train"])]
    rounds_eval = [t / o for o, t in zip(times["ours_eval"], times["theirs_eval"])]
    row = {"max_abs_diff": max_diff, "compile_s": compile_s, **{f"{k}_s": v for k, v in per.items()},
           "rounds": rounds, "train_ratio_rounds": rounds_train, "eval_ratio_rounds": rounds_eval,
           "ours_train_trials_per_s": B / per["ours_train"], "torch_train_trials_per_s": B / per["theirs_train"],
           "ours_eval_forwards_per_s": B / per["ours_eval"], "torch_eval_forwards_per_s": B / per["theirs_eval"],
           "ours_plain_forwards_per_s": B / per["ours_forward"]}
    row["train_ratio"] = row["ours_train_trials_per_s"] / row["torch_train_trials_per_s"]
    row["eval_ratio"] = row["ours_eval_forwards_per_s"] / row["torch_eval_forwards_per_s"]
    results["sizes"][str(B)] = row
    log(f"torch B={B}: train {row['ours_train_trials_per_s']:.1f} vs {row['torch_train_trials_per_s']:.1f} trials/s "
        f"({row['train_ratio']:.2f}x, rounds {_spread(rounds_train)}), eval {row['ours_eval_forwards_per_s']:.1f} vs "
        f"{row['torch_eval_forwards_per_s']:.1f} forwards/s ({row['eval_ratio']:.2f}x, rounds "
        f"{_spread(rounds_eval)}); outputs equal to {max_diff:.1e}")
  return results


def _spread(ratios) -> str:
  return f"{min(ratios):.2f}-{max(ratios):.2f}"


def format_table(results: dict, label: str = "") -> str:
  lines = [f"ours vs PyTorch {label}({results.get('dtype', 'float32')}; torch {results['torch_version']}, "
           f"{results['torch_threads']} threads; "
           f"ratio = ours / PyTorch throughput)",
           "| batch | train trials/s ours | PyTorch | ratio (rounds) | eval forwards/s ours | PyTorch | ratio (rounds) "
           "| max |diff| |",
           "|---|---|---|---|---|---|---|---|"]
  for B, r in results["sizes"].items():
    lines.append(f"| {B} | {r['ours_train_trials_per_s']:.1f} | {r['torch_train_trials_per_s']:.1f} | "
                 f"{r['train_ratio']:.2f} ({_spread(r['train_ratio_rounds'])}) | {r['ours_eval_forwards_per_s']:.1f} | "
                 f"{r['torch_eval_forwards_per_s']:.1f} | {r['eval_ratio']:.2f} ({_spread(r['eval_ratio_rounds'])}) | "
                 f"{r['max_abs_diff']:.1e} |")
  return "\n".join(lines)
