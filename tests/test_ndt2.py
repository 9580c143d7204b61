"""NDT2 (space-time patches): golden parity with the original STPatch in compat mode, strict causality and
per-trial padding of our default, masking on patches, one compilation, resume, and the whole house (train,
evaluate, fine-tune, convert) through the model-family contract."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax import traverse_util

from ibl_jax import convert, finetune, masking, models, optim, runs, steps as steps_lib, train
from ibl_jax import evaluate
from ibl_jax.models import fused_attention
from ibl_jax.data import batches as batches_lib
from ibl_jax.data.sessions import load_corpus
from ibl_jax.models import ndt2
from ibl_jax.models.torch_names import TorchCheckpoint, TorchSession

from conftest import apply_overrides, load_config_module

FIXTURE = Path(__file__).resolve().parent / "testdata" / "mtm_ndt2_small"
MODES = ["neuron", "causal", "inter-region", "intra-region"]
ALL_SCHEMES = ",".join(masking.SCHEMES)


def tiny_model_cfg(**overrides):
  cfg = models.family("ndt2").default_config("small")
  cfg.update(patch_neurons=4, max_neurons=32, hidden_size=16, num_layers=2, num_heads=2, mlp_size=32, max_bins=16)
  cfg.update(overrides)
  return cfg


def tiny_config(corpus_dir, results_dir, **overrides):
  """configs/ndt2.py shrunk: tiny model, short run, every interval at a few steps."""
  c = load_config_module("ndt2").get_config()
  c.data.sessions = str(Path(corpus_dir) / "train_eids.txt")
  c.data.batch_size = 8
  c.results_dir, c.run_name = str(results_dir), "tiny"
  c.model.update(patch_neurons=8, hidden_size=16, num_layers=1, num_heads=2, mlp_size=32)
  c.masking.token_neurons = 8
  t = c.training
  t.num_steps, t.log_every, t.eval_every, t.checkpoint_every, t.eval_batches = 6, 1, 3, 3, 1
  t.quick_cosmooth_neurons = 4
  return apply_overrides(c, overrides)


def forward_fn(model):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, *args: nnx.merge(graphdef, s)(*args)), state


# --- golden parity with the original STPatch (compat mode) -------------------------------------------------


@pytest.fixture(scope="module")
def golden():
  return dict(np.load(FIXTURE / "state_dict.npz")), dict(np.load(FIXTURE / "io.npz"))


@pytest.fixture(scope="module")
def imported(golden):
  state_dict, _ = golden
  cfg = ndt2.config_from_torch(TorchCheckpoint(state_dict, {}), num_heads=4, log=lambda _: None)
  sessions = [TorchSession("a", 37, 0), TorchSession("b", 52, 1)]
  model = ndt2.NDT2(cfg, num_sessions=2, n_max=52, session_neurons=(37, 52), rngs=nnx.Rngs(0))
  nnx.update(model, ndt2.params_from_torch(state_dict, cfg, sessions))
  return cfg, model


def test_compat_patches_and_attention_masks_match_the_original(golden, imported):
  _, io = golden
  _, model = imported
  time_mask_BxT = io["time_attn_mask"].astype(bool)
  for n in (37, 52):
    neuron_mask_BxN = np.broadcast_to(np.arange(52) < n, (3, 52))
    patches, key_real = model.patch(jnp.asarray(io[f"spikes_N{n}"][:, :, :52]), jnp.asarray(time_mask_BxT),
                                    jnp.asarray(neuron_mask_BxN))
    np.testing.assert_array_equal(patches, io[f"patches_N{n}"])  # copies in the partial patch included
    for mode in MODES:
      mask = model.attention_mask(key_real, mode == "causal")
      np.testing.assert_array_equal(mask, io[f"attn_mask_N{n}_{mode}"].astype(bool), err_msg=f"N{n} {mode}")
    _, alone = model.patch(jnp.asarray(io[f"spikes_N{n}"][2:3, :, :52]), jnp.asarray(time_mask_BxT[2:3]),
                           jnp.asarray(neuron_mask_BxN[2:3]))
    np.testing.assert_array_equal(model.attention_mask(alone, False),
                                  io[f"attn_mask_N{n}_neuron_trial2_alone"].astype(bool))


def test_compat_reproduces_the_original_outputs(golden, imported):
  _, io = golden
  _, model = imported
  forward, state = forward_fn(model)
  time_mask_BxT = io["time_attn_mask"].astype(bool)
  worst = {}
  for session, n in enumerate(io["num_neurons"]):
    cases = [(f"N{n}_{m}", io[f"spikes_N{n}"], time_mask_BxT, p, m == "causal") for p, m in enumerate(MODES)]
    cases += [(f"N{n}_neuron_heldout", io[f"spikes_N{n}_heldout"], time_mask_BxT, 0, False),
              (f"N{n}_neuron_trial2_alone", io[f"spikes_N{n}"][2:3], time_mask_BxT[2:3], 0, False)]
    for name, spikes, time_mask, prompt, causal in cases:
      b = len(spikes)
      out = forward(state, spikes[:, :, :52], time_mask, jnp.full(b, session), jnp.int32(prompt), jnp.bool_(causal))
      worst[name] = float(np.abs(np.asarray(out)[..., :n] - io[f"preds_{name}"]).max())  # padded bins included
  assert len(worst) == sum(k.startswith("preds_") for k in io)
  assert max(worst.values()) <= 1e-5, worst


def test_convert_cli_imports_the_pickle_and_export_round_trips(golden, tmp_path):
  state_dict, io = golden
  eids = [str(e) for e in io["eids"]]
  argv = ["--from-torch", str(FIXTURE / "model_best.pt"), "--out", str(tmp_path / "run"), "--eids", ",".join(eids),
          "--num-neurons", "37,52"]
  assert convert.main(argv) == 0
  run = runs.open_run(tmp_path / "run")
  assert run.config.model.name == "ndt2" and run.config.model.compat == "original" and run.num_neurons == [37, 52]
  assert run.config.model.num_heads == 4 and run.config.model.patch_neurons == 16  # read from the pickle
  graphdef, params, _ = runs.load_params(run)
  out = nnx.merge(graphdef, params)(io["spikes_N52"][:, :, :52], io["time_attn_mask"].astype(bool),
                                    jnp.ones(3, jnp.int32), 1, True)
  np.testing.assert_allclose(np.asarray(out), io["preds_N52_causal"], atol=1e-5)

  exported = convert.params_to_torch_state_dict(params, run.config.model, run.num_neurons)
  assert set(exported) == set(state_dict)
  for name, value in state_dict.items():
    expected = value[:2] if name == "encoder.embedder.embed_session.weight" else value  # our two sessions' rows
    np.testing.assert_array_equal(exported[name], expected, err_msg=name)
  back = ndt2.params_from_torch(exported, run.config.model, [TorchSession(e, n, i) for i, (e, n) in
                                                             enumerate(zip(eids, [37, 52]))])
  flat = lambda p: traverse_util.flatten_dict(nnx.to_pure_dict(p) if isinstance(p, nnx.State) else p)
  expected = flat(params)
  for path, value in flat(back).items():
    np.testing.assert_array_equal(value, expected[path], err_msg=str(path))


def test_convert_without_neuron_counts_says_so(tmp_path, capsys):
  argv = ["--from-torch", str(FIXTURE / "model_best.pt"), "--out", str(tmp_path / "run"), "--eids", "a,b"]
  assert convert.main(argv) == 2
  err = capsys.readouterr().err
  assert "--num-neurons" in err and err.count("\n") == 1, err


# --- our default: per-trial padding, strict causality ------------------------------------------------------


def _inputs(seed=0, b=3, T=12, n_max=10):
  spikes = np.random.default_rng(seed).poisson(1.0, (b, T, n_max)).astype(np.float32)
  return spikes, np.ones((b, T), bool)


def test_default_is_strictly_causal_in_time():
  model = ndt2.NDT2(tiny_model_cfg(), num_sessions=3, n_max=10, session_neurons=(10, 7, 5), rngs=nnx.Rngs(0))
  forward, state = forward_fn(model)
  spikes, time_mask = _inputs()
  session_idx = jnp.arange(3)
  for t in (0, 5, 10):
    perturbed = spikes.copy()
    perturbed[:, t + 1:] += 3.0
    for causal, prompt in ((True, 1), (False, 0)):
      a = np.asarray(forward(state, spikes, time_mask, session_idx, jnp.int32(prompt), jnp.bool_(causal)))
      b = np.asarray(forward(state, perturbed, time_mask, session_idx, jnp.int32(prompt), jnp.bool_(causal)))
      if causal:
        np.testing.assert_array_equal(a[:, :t + 1], b[:, :t + 1], err_msg=f"bins <= {t} saw later bins")
      else:  # the same perturbation is visible without the causal mask: the test can see a leak
        assert np.abs(a[:, :t + 1] - b[:, :t + 1]).max() > 1e-4


def test_shared_decoder_bias_starts_at_the_corpus_mean_rate():
  """NDT2's decoder is shared by sessions and neurons: init_log_rate_bias sets its bias to one value, the log of
  the mean count over every real neuron; with a zero decoder kernel every output is that rate."""
  cfg = tiny_model_cfg()
  model = ndt2.NDT2(cfg, num_sessions=2, n_max=10, session_neurons=(10, 5), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  mean_counts = [np.full(10, 0.1), np.array([0.2, 0.2, 0.4, 0.0, 0.0])]
  shared = models.shared_log_rate(mean_counts)
  np.testing.assert_allclose(shared, np.log(1.8 / 15), rtol=1e-6)  # (10 x 0.1 + 0.2 + 0.2 + 0.4) / 15 neurons
  out = models.set_log_rate_bias(cfg, params, models.log_rate_bias(mean_counts, 10), shared)
  np.testing.assert_allclose(out["decoder"]["bias"], np.full(params["decoder"]["bias"].shape, np.log(1.8 / 15)),
                             rtol=1e-6)
  assert models.set_log_rate_bias(cfg, params, models.log_rate_bias(mean_counts, 10)) is params  # no value given
  out["decoder"]["kernel"] = np.zeros_like(out["decoder"]["kernel"])
  forward, _ = forward_fn(model)
  spikes, time_mask = _inputs(b=2)
  log_rates = forward(nnx.State(out), spikes, time_mask, jnp.arange(2), jnp.int32(0), jnp.bool_(False))
  np.testing.assert_allclose(np.exp(log_rates), 1.8 / 15, rtol=1e-5)


def test_encoder_order_puts_real_tokens_first_and_padded_tokens_see_only_themselves():
  model = ndt2.NDT2(tiny_model_cfg(), num_sessions=2, n_max=10, session_neurons=(10, 5), rngs=nnx.Rngs(0))
  key_real = jnp.asarray([[1, 1, 0, 1, 0, 1], [1, 1, 1, 1, 1, 1]], bool)  # 3 space patches x 2 time patches
  order, inverse = ndt2.real_first(key_real)
  np.testing.assert_array_equal(order[0], [0, 1, 3, 5, 2, 4])  # real ones in time-major order, then padding
  np.testing.assert_array_equal(order[1], np.arange(6))
  np.testing.assert_array_equal(jnp.take_along_axis(order, inverse, 1), np.broadcast_to(np.arange(6), (2, 6)))
  P = model.num_prefix
  for causal in (False, True):
    mask = np.asarray(model.attention_mask(key_real, causal, order))
    for row, token in ((P + 4, 2), (P + 5, 4)):  # trial 0's padded tokens, last in its order: themselves only
      np.testing.assert_array_equal(mask[0, row], np.arange(P + 6) == row, err_msg=f"token {token}")
    # Token 0 (time patch 0): the prefix, tokens 0 and 1 (time 0), tokens 3 and 5 (time 1) unless causal; never
    # the padded ones.
    want = [True] * P + [True, True, not causal, not causal, False, False]
    np.testing.assert_array_equal(mask[0, P], want)


@pytest.mark.skipif(not fused_attention.available(16), reason="no C++ compiler: the kernel is not built")
def test_real_first_order_through_the_cpu_kernel_equals_the_pure_jax_attention(monkeypatch):
  # 257 tokens (2 prefix + 85 bins x 3 space patches): the layers take the fused kernel, which reads each query's
  # keys up to its last real one. Against the same model on the pure-JAX attention: outputs and gradients on
  # the real neurons, causal or not, sessions of 10, 7 and 3 neurons (0, 1 and 2 padded space patches).
  cfg = tiny_model_cfg(hidden_size=32, max_bins=96)
  model = ndt2.NDT2(cfg, num_sessions=3, n_max=10, session_neurons=(10, 7, 3), rngs=nnx.Rngs(2))
  graphdef, params = steps_lib.split_params(model)
  spikes, time_mask = _inputs(seed=4, T=85)
  time_mask[1, 80:] = False  # and padded bins
  real = time_mask[:, :, None] & (np.arange(10)[None, None, :] < np.array([10, 7, 3])[:, None, None])
  weights = np.random.default_rng(0).normal(size=spikes.shape) * real

  def run():  # a new function each time: jax.jit's cache would otherwise keep the first trace
    def loss(p, causal):
      log_rates = nnx.merge(graphdef, p)(spikes, time_mask, jnp.arange(3), jnp.int32(1), causal)
      return jnp.sum(log_rates * weights), log_rates

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    kernel = "ibl_attention_forward" in fn.lower(params, jnp.bool_(False)).as_text()
    return kernel, [fn(params, jnp.bool_(c)) for c in (False, True)]

  kernel, got = run()
  assert kernel
  monkeypatch.setattr(fused_attention, "available", lambda head_dim: False)
  kernel, want = run()
  assert not kernel
  for ((_, a), ga), ((_, b), gb) in zip(got, want):
    np.testing.assert_allclose(np.where(real, a, 0), np.where(real, b, 0), atol=2e-5)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
      np.testing.assert_allclose(x, y, atol=2e-4, rtol=2e-4)


def test_padded_neurons_are_invisible_and_batches_mix_sessions():
  model = ndt2.NDT2(tiny_model_cfg(), num_sessions=3, n_max=10, session_neurons=(10, 7, 5), rngs=nnx.Rngs(1))
  forward, state = forward_fn(model)
  spikes, time_mask = _inputs(1)
  session_idx = jnp.arange(3)
  out = np.asarray(forward(state, spikes, time_mask, session_idx, jnp.int32(0), jnp.bool_(False)))
  garbage = spikes.copy()
  garbage[1, :, 7:] = 50.0  # padded slots of sessions 1 (7 neurons) and 2 (5): a partial and a whole patch
  garbage[2, :, 5:] = 50.0
  out_garbage = np.asarray(forward(state, garbage, time_mask, session_idx, jnp.int32(0), jnp.bool_(False)))
  np.testing.assert_array_equal(out_garbage[1, :, :7], out[1, :, :7])
  np.testing.assert_array_equal(out_garbage[2, :, :5], out[2, :, :5])
  for i in range(3):  # per-trial neuron counts and masks: a trial's output does not depend on its batch mates
    alone = np.asarray(forward(state, spikes[i:i + 1], time_mask[i:i + 1], session_idx[i:i + 1], jnp.int32(0),
                               jnp.bool_(False)))
    np.testing.assert_allclose(alone[0], out[i], atol=1e-5)
  # ... and a padded bin of one trial is not attended to, while its batch mates keep theirs.
  short = time_mask.copy()
  short[0, 8:] = False
  out_short = np.asarray(forward(state, spikes, short, session_idx, jnp.int32(0), jnp.bool_(False)))
  np.testing.assert_allclose(out_short[1:], out[1:], atol=1e-5)
  assert np.abs(out_short[0, :8] - out[0, :8]).max() > 1e-4


def test_padded_neurons_are_never_targets():
  rng = np.random.default_rng(0)
  neuron_mask = np.arange(10)[None] < np.array([[10], [7], [5], [3]])
  batch = {"spikes": rng.poisson(1.0, (4, 12, 10)).astype(np.uint8) * neuron_mask[:, None],
           "neuron_mask": neuron_mask, "time_mask": np.ones((4, 12), bool),
           "neuron_regions": rng.integers(0, 3, (4, 10))}
  mask = jax.jit(lambda key, scheme_id: masking.mask_batch(key, batch, scheme_id, ratio=0.5, token_shape=(2, 4)))
  for scheme_id, scheme in enumerate(masking.SCHEMES):
    targets = np.stack([np.asarray(mask(jax.random.key(seed), jnp.int32(scheme_id)).targets_mask_BxTxN)
                        for seed in range(10)])
    assert targets.any() and not (targets & ~neuron_mask[None, :, None]).any(), scheme
  assert mask._cache_size() == 1  # every scheme, random_token included, in one compilation


def test_random_token_hides_whole_patches():
  batch = {"spikes": np.ones((2, 12, 10), np.uint8), "neuron_mask": np.ones((2, 10), bool),
           "time_mask": np.ones((2, 12), bool), "neuron_regions": np.zeros((2, 10), int)}
  m = masking.mask_batch(jax.random.key(0), batch, masking.SCHEMES.index("random_token"), ratio=0.5,
                         token_shape=(3, 4))
  hidden = np.asarray(m.targets_mask_BxTxN)
  padded = np.pad(hidden, ((0, 0), (0, 0), (0, 2)))  # 10 neurons -> 3 patches of 4
  patches = padded.reshape(2, 4, 3, 3, 4)
  assert (patches.all((2, 4)) | ~patches.any((2, 4)))[:, :, :2].all()  # whole patches only
  assert 0.2 < hidden.mean() < 0.8
  np.testing.assert_array_equal(np.asarray(m.inputs_BxTxN)[hidden], 0.0)


# --- the training loop through the contract ----------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(corpus_dir):
  return load_corpus(str(corpus_dir / "train_eids.txt"), with_true_rates=True)


def test_one_compilation_across_schemes_and_sessions(corpus, corpus_dir, tmp_path):
  config = tiny_config(corpus_dir, tmp_path, **{"masking.scheme": ALL_SCHEMES})
  model = steps_lib.build_model(config.model, num_sessions=len(corpus.sessions), n_max=corpus.n_max,
                                session_neurons=[s.num_neurons for s in corpus.sessions])
  graphdef, params = steps_lib.split_params(model)
  tx = optim.make_optimizer(config.training)
  steps = steps_lib.Steps(graphdef=graphdef, tx=tx, masking_cfg=config.masking, objective="mtm")
  train_step, eval_loss = jax.jit(steps.train_step), jax.jit(steps.eval_loss)
  opt_state = tx.init(params)
  it = batches_lib.BatchIterator(corpus, "train", 8, seed=0)
  seen = set()
  for i in range(12):
    batch = next(it)
    params, opt_state, m = train_step(params, opt_state, batch, jnp.int32(i), jax.random.key(0))
    seen.add(int(m["scheme_id"]))
    assert np.isfinite(float(m["loss"]))
  for scheme_id in range(len(masking.SCHEMES)):
    total, count = eval_loss(params, batch, jnp.int32(scheme_id), jax.random.key(scheme_id))
    assert float(count) > 0 and np.isfinite(float(total)), masking.SCHEMES[scheme_id]
  assert len(seen) >= 4 and len({int(s) for s in batch["session_idx"]}) > 1
  assert train_step._cache_size() == 1 and eval_loss._cache_size() == 1


def test_resume_reproduces_the_curve_then_evaluate_and_finetune_run(corpus_dir, tmp_path):
  full = tiny_config(corpus_dir, tmp_path, run_name="full")
  summary = train.train_and_evaluate(full)
  assert summary["train_step_compilations"] == 1
  part = tiny_config(corpus_dir, tmp_path, run_name="part", **{"training.stop_after": 4})
  assert not train.train_and_evaluate(part)["completed"]
  part.training.stop_after = None
  assert train.train_and_evaluate(part)["start_step"] == 4

  def curve(name):
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}

  full_curve, part_curve = curve("full"), curve("part")
  assert sorted(part_curve) == list(range(1, 7))
  np.testing.assert_allclose([part_curve[s] for s in range(1, 7)], [full_curve[s] for s in range(1, 7)], rtol=1e-6)

  # Every evaluation task on one training session, through the contract.
  run = runs.open_run(tmp_path / "full")
  results = evaluate.evaluate_run(str(tmp_path / "full"), sessions=run.sources[0], tasks=None, figures=False,
                                  progress=False)
  tasks = next(iter(results.values()))["tasks"]
  assert {"co_smooth", "forward_pred", "inter_region", "intra_region", "behaviour"} <= set(tasks)
  assert np.isfinite(tasks["co_smooth"]["bps_per_neuron"])

  # Fine-tuning on a new session with a frozen encoder: only the session token moves.
  c = load_config_module("finetune").get_config()
  c.pretrained, c.data.sessions = str(tmp_path / "full"), str(corpus_dir / "test_eids.txt")
  c.results_dir, c.run_name, c.data.batch_size = str(tmp_path), "ft", 8
  t = c.training
  t.num_steps, t.log_every, t.eval_every, t.checkpoint_every, t.eval_batches, t.quick_cosmooth_neurons = 2, 1, 2, 2, 1, 4
  c.eval.tasks, c.eval.figures, c.finetune.freeze_encoder = "co_smooth", False, True
  out = finetune.finetune(c)
  assert out["train"]["steps"] == 2
  _, pre, _ = runs.load_params(run)
  _, ft, _ = runs.load_params(runs.open_run(tmp_path / "ft"), "latest")
  for name in ft:
    if name not in ndt2.SESSION_PARAMS:
      jax.tree.map(np.testing.assert_array_equal, ft[name], pre[name])


def test_region_embedding_adds_each_patch_majority_region(corpus_dir, tmp_path):
  # By hand, patches of 3: [1 1 2] -> 1, [3 3 0] -> 3, [5] -> 5; [2 1] ties -> the smaller id; empty patches -> 0.
  assert ndt2.patch_regions([[1, 1, 2, 3, 3, 0, 5], [2, 1]], num_space=3, F=3) == ((1, 3, 5), (1, 0, 0))
  cfg = tiny_model_cfg(embed_region=True, num_regions=8)  # 4 neurons a patch
  regions = [[0, 0, 1, 1, 2, 2, 2, 2, 3, 3], [4] * 7]
  other = [[0, 0, 1, 1, 5, 5, 5, 2, 3, 3], [4] * 7]  # session 0's second patch: region 2 -> 5
  forward, state = forward_fn(ndt2.NDT2(cfg, num_sessions=2, n_max=10, session_neurons=(10, 7),
                                        session_regions=regions, rngs=nnx.Rngs(0)))
  forward_other, state_other = forward_fn(ndt2.NDT2(cfg, num_sessions=2, n_max=10, session_neurons=(10, 7),
                                                    session_regions=other, rngs=nnx.Rngs(0)))
  jax.tree.map(np.testing.assert_array_equal, state, state_other)  # same parameters, only the table differs
  spikes, time_mask = _inputs(b=2)
  args = (spikes, time_mask, jnp.arange(2), jnp.int32(0), jnp.bool_(False))
  a, b = np.asarray(forward(state, *args)), np.asarray(forward_other(state_other, *args))
  assert np.abs(a[0] - b[0]).max() > 1e-4  # session 0 sees its new region
  np.testing.assert_array_equal(a[1], b[1])  # session 1 does not
  with pytest.raises(models.UserError, match="session_regions"):
    ndt2.NDT2(cfg, num_sessions=1, n_max=10, rngs=nnx.Rngs(0))
  with pytest.raises(models.UserError, match="num_regions=8"):
    ndt2.NDT2(cfg, num_sessions=1, n_max=10, session_neurons=(3,), session_regions=[[9, 9, 9]], rngs=nnx.Rngs(0))
  # Through training: the run saves the regions (corpus.json) that rebuild the same model for evaluation.
  c = tiny_config(corpus_dir, tmp_path, **{"model.embed_region": True, "training.num_steps": 2,
                                           "training.eval_every": 2, "training.checkpoint_every": 2})
  c.eval.tasks, c.eval.figures = "co_smooth", False
  assert train.train_and_evaluate(c)["steps"] == 2
  run = runs.open_run(tmp_path / "tiny")
  graphdef, params, _ = runs.load_params(run)
  model = nnx.merge(graphdef, nnx.State(params))
  assert model.patch_regions == ndt2.patch_regions(run.neuron_regions, model.num_space, model.patch_neurons)
  assert np.asarray(params["embed_region"]["embedding"]).shape == (256, 16)


# --- the contract ------------------------------------------------------------------------------------------


def test_flops_per_trial_matches_xla_count():
  cfg = tiny_model_cfg(hidden_size=32, mlp_size=64)
  model = ndt2.NDT2(cfg, num_sessions=1, n_max=30, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  fn = lambda p, x, m: nnx.merge(graphdef, p)(x, m, jnp.zeros(1, jnp.int32), 0, True)
  cost = jax.jit(fn).lower(params, jnp.zeros((1, 16, 30)), jnp.ones((1, 16), bool)).compile().cost_analysis()
  xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
  ours = ndt2.flops_per_trial(cfg, 16, 30)
  assert ours <= xla_flops <= 1.3 * ours, (ours, xla_flops)


def test_every_known_family_fulfils_the_contract_and_unknown_names_fail():
  assert models.known() == ("ndt1", "ndt2")  # discovered, not listed
  for name in models.known():
    family = models.family(name)
    for size in ("small", "paper"):
      cfg = family.default_config(size)
      assert cfg.name == name and set(family.ARCHITECTURE) <= set(cfg)
      assert family.activation_bytes_per_row(cfg, 100, 668) > 0 and family.flops_per_trial(cfg, 100, 668) > 0
  with pytest.raises(models.UserError, match="model.name='ndt9'"):
    models.family("ndt9")
  paper = models.family("ndt2").default_config("paper")
  assert (paper.patch_neurons, paper.patch_bins) == (128, 1)


def test_chunk_size_follows_the_family_activation_memory():
  class FakeGPU:  # 80 GiB
    platform = "gpu"

    def memory_stats(self):
      return {"bytes_limit": 80 * 2**30}

  paper = models.family("ndt2").default_config("paper")
  # K = 100 bins x ceil(668 / 128) = 6 patches = 600 tokens, L = 602: a row is
  # 4 * (3*100*668 + 2*600*128 + 6*602*512 + 2*602*1024 + 2*8*602^2) = 36.9 MB; a quarter of 80 GiB holds 581.
  assert ndt2.activation_bytes_per_row(paper, 100, 668) == 4 * 9_234_704
  assert evaluate.auto_chunk_size(paper, 100, 668, [FakeGPU()]) == 512
  # A CPU device holds 2**27 bytes of them: 3.6 rows -> 2 a device (NDT1's 3.56 MB rows: 37 -> at most 32).
  assert evaluate.auto_chunk_size(paper, 100, 668, jax.devices("cpu")) == 2 * len(jax.devices("cpu"))
  small = models.family("ndt2").default_config("small")  # 4.04 MB a row (N_max 160): 33 -> at most 32
  assert evaluate.auto_chunk_size(small, 100, 160, jax.devices("cpu")) == 32 * len(jax.devices("cpu"))
  assert evaluate.auto_chunk_size(models.family("ndt1").default_config("paper"), 100, 668, [FakeGPU()]) == 4096
