"""NDT1 pretrained with multi-task masking (MtM) on the synthetic corpus — the default run.

  python -m ibl_jax.train --config=configs/ndt1.py
  python -m ibl_jax.train --config=configs/ndt1.py --config.training.num_steps=200
  python -m ibl_jax.train --config=configs/ndt1.py:paper      # the paper-size model of docs/design.md §5
  python -m ibl_jax.train --config=configs/ndt1.py --config.data.sessions=/path/eids.txt   # real data

The default model is reduced so the run finishes on a 2-core CPU in minutes; `:paper` switches every model
field to the paper's values (stitch 668, embed ×2, hidden 512, 5 layers, 8 heads, MLP 1024).
"""

from ml_collections import config_dict

from ibl_jax import models


def model_config(size: str = "small") -> config_dict.ConfigDict:
  return models.family("ndt1").default_config(size)  # the model section lives with the model (ibl_jax/models)


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  size = arg or "small"
  if size not in ("small", "paper"):
    raise ValueError(f"configs/ndt1.py: unknown variant {arg!r}; use :small (default) or :paper")
  c = config_dict.ConfigDict()
  c.name = "ndt1_mtm" if size == "small" else "ndt1_mtm_paper"
  c.run_name = config_dict.placeholder(str)  # default: c.name
  c.results_dir = "results"
  c.seed = 0

  c.data = config_dict.ConfigDict()
  # A directory of sessions, an eids/paths file, or comma-separated paths/hub ids. Default: the synthetic
  # corpus, generated on first use.
  c.data.sessions = "data/synthetic/train_eids.txt"
  c.data.synthetic_dir = "data/synthetic"  # generated here when `sessions` points into it and it is absent
  c.data.synthetic_sessions = 6
  c.data.cache_dir = config_dict.placeholder(str)  # hub cache for `datasets.load_dataset`
  # Decoded sessions as memory-mapped .npy (docs/design.md §3). Default: <data>/../.ibl_jax_cache/<session>;
  # a directory; or "off" to decode into memory on every start.
  c.data.array_cache = config_dict.placeholder(str)
  c.data.regions = config_dict.placeholder(str)  # comma-separated acronyms to keep; default all
  c.data.neuron_order = "none"  # none | depth | region
  c.data.trial_filter = config_dict.placeholder(str)  # .npy with a boolean mask per split
  c.data.batch_size = 16

  c.model = model_config(size)

  c.masking = config_dict.ConfigDict()
  c.masking.scheme = "mtm"  # neuron | temporal | causal | inter-region | intra-region | random | mtm
  c.masking.mtm_schemes = "neuron,causal,inter-region,intra-region"
  c.masking.ratio = 0.3
  c.masking.causal_ratio = 0.6
  c.masking.zero_ratio = 1.0  # of the masked entries, the fraction zeroed
  c.masking.random_ratio = 1.0  # of the rest, the fraction replaced by random counts

  c.training = config_dict.ConfigDict()
  c.training.objective = "mtm"  # ibl_jax/objectives.py: masked modelling with a Poisson loss
  c.training.num_steps = 6000 if size == "small" else 20000  # small: 3000 steps left MtM below the baseline (README)
  c.training.learning_rate = 3e-3 if size == "small" else 1e-4
  c.training.warmup_fraction = 0.1  # one-cycle: linear warmup, then cosine decay
  c.training.weight_decay = 0.01
  c.training.adam_eps = 1e-8
  c.training.grad_clip_norm = 1.0
  c.training.log_every = 25
  c.training.eval_every = 500
  c.training.eval_batches = 4
  c.training.quick_cosmooth_neurons = 16
  c.training.checkpoint_every = 500
  c.training.keep_checkpoints = 2
  c.training.resume = True
  c.training.stop_after = config_dict.placeholder(int)  # stop (with a checkpoint) at this step, as on SIGTERM
  c.training.best_metric = "val_loss"  # the best checkpoint: val_loss (lowest) | cosmooth_bps (highest)
  c.training.early_stop_patience = 0  # stop after this many evaluations without a better best_metric; 0: never
  # The readout bias starts at each neuron's log mean count (models.log_rate_bias), not at 0 (1 spike per bin).
  c.training.init_log_rate_bias = True
  # Poisson NLL summed over target entries, as the original (logged train loss: that sum) | "mean" per entry.
  # Sum measured better on every task of the default run (README, "Recipe and baseline").
  c.training.loss_reduction = "sum"

  c.eval = config_dict.ConfigDict()  # the evaluation suite (python -m ibl_jax.evaluate)
  c.eval.tasks = "co_smooth,forward_pred,inter_region,intra_region,behaviour"
  c.eval.chunk_size = 0  # leave-one-out inputs per compiled call; 0: sized per device (evaluate.auto_chunk_size)
  c.eval.forward_bins = 10  # forward prediction: the last bins, predicted causally
  c.eval.figures = True
  c.eval.baseline = True  # score the smoothing/PSTH baseline (ibl_jax/baselines.py) beside the model: baseline_*
  # Behaviour decoding protocol (ibl_jax/evaluate/decoding.py): "ours" (windowed rates, per-bin ridge) or "paper"
  # (flattened log-rates, whole-trace ridge, causal prompt for traces); see docs/design.md §13 for the choice.
  c.eval.decoding = "paper"
  c.eval.decoding_trial_filter = config_dict.placeholder(str)  # trials kept for decoding only (trial_filter formats)

  c.bench = config_dict.ConfigDict()  # python -m ibl_jax.bench
  c.bench.neurons = 668 if size == "paper" else 160  # N_max of its synthetic sessions (paper: IBL-like widths)

  c.mesh = config_dict.ConfigDict()
  c.mesh.data = -1  # -1: all devices
  c.mesh.fsdp = 1  # >1: parameters and optimiser state sharded over this axis (FSDP), the batch over both
  c.mesh.fsdp_min_size = 2**14  # leaves smaller than this stay replicated
  # Per-session tables (stitchers, session embeddings) and their AdamW moments split over all devices, whatever
  # the mesh: they grow with the sessions (families with lazy session rows: NDT1).
  c.mesh.shard_sessions = True
  c.mesh.cpu_devices = 2  # on a CPU host: split it into this many JAX devices (no effect on GPU/TPU)
  # On a CPU host (glibc): restart once with malloc reusing freed memory (ibl_jax/hostmem.py: "one_arena",
  # "thread_arenas" or "off"). The paper model's step temporaries (246 MiB a device) were page-faulted in every
  # step: one arena, 0.95-1.03 -> 0.78-0.80 s a step, for 0.9 GB more peak memory (1.85 -> 2.75 GB). The small
  # model's temporaries are reused anyway, and its steps lost to the single arena's lock (419 -> 285-341
  # trials/s), so only the paper size.
  c.mesh.reuse_freed_memory = "one_arena" if size == "paper" else "off"

  c.distributed = config_dict.ConfigDict()
  c.distributed.coordinator = config_dict.placeholder(str)
  c.distributed.num_processes = config_dict.placeholder(int)
  c.distributed.process_id = config_dict.placeholder(int)
  c.distributed.heartbeat_timeout_s = 100  # a dead process ends the others after about this long
  return c
