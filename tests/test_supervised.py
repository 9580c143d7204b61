"""Supervised decoding heads: metrics by hand, batches, the head learns what is decodable (and not a shuffle),
fine-tuning a head on a pretrained encoder (frozen and not), NDT2, resume."""

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from ibl_jax import finetune, metrics, runs, supervised, train
from ibl_jax.data import batches as batches_lib
from ibl_jax.data import sessions as sessions_lib
from ibl_jax.errors import UserError
from ibl_jax.evaluate import decoding
from ibl_jax.models import heads

from conftest import apply_overrides, load_config_module, tiny_config

T, N = 20, 12
SPLIT_TRIALS = {"train": 64, "val": 16, "test": 40}


def _decodable_session(rng, eid: str, idx: int, *, shuffle_fit_choice: bool = False) -> sessions_lib.Session:
  """Choice sets neurons 0-5 (+1) or 6-11 (-1) firing in bins 5-14; neurons 8-11 follow the wheel trace."""
  splits = {}
  for name, K in SPLIT_TRIALS.items():
    choice_K = rng.choice([-1.0, 1.0], K)
    block_K = rng.choice([0.2, 0.5, 0.8], K)
    wheel_KxT = np.abs(np.cumsum(rng.normal(0, 0.5, (K, T)), axis=1)).astype(np.float32)
    rates_KxTxN = np.full((K, T, N), 0.2)
    rates_KxTxN[:, 5:15, :6] += 1.5 * (choice_K[:, None, None] > 0)
    rates_KxTxN[:, 5:15, 6:] += 1.5 * (choice_K[:, None, None] < 0)
    rates_KxTxN[:, :, 8:] += 1.5 * wheel_KxT[:, :, None]
    spikes = rng.poisson(rates_KxTxN).clip(0, 255).astype(np.uint8)
    if shuffle_fit_choice and name != "test":
      # The control: the fit labels are independent of the spikes. Exactly half of each class flips, so no residual
      # agreement (a plain permutation keeps ~50 ± 6 %, enough for a head to learn the true direction).
      flip_K = np.zeros(K, bool)
      for c in (-1.0, 1.0):
        members = np.flatnonzero(choice_K == c)
        flip_K[rng.permutation(members)[:len(members) // 2]] = True
      choice_K = np.where(flip_K, -choice_K, choice_K)
    splits[name] = sessions_lib.Split(spikes=spikes, true_rates=rates_KxTxN.astype(np.float32), behaviour={
        "choice": choice_K.astype(np.float32), "block": block_K.astype(np.float32), "wheel-speed": wheel_KxT})
  regions = np.array(["CA1"] * 6 + ["LP"] * 6)
  return sessions_lib.Session(eid=eid, source=eid, splits=splits, regions=regions, depths=np.arange(N, dtype=float),
                              uuids=np.array([f"{eid}-{i}" for i in range(N)]), region_ids=(regions == "LP").astype(
                                  np.int32), session_idx=idx)


def _corpus(seed: int = 0, **kwargs) -> sessions_lib.Corpus:
  rng = np.random.default_rng(seed)
  return sessions_lib.Corpus(sessions=[_decodable_session(rng, f"s{i}", i, **kwargs) for i in range(2)],
                             region_vocab=["CA1", "LP"])


def _supervised_config(results, targets="choice,wheel-speed", **overrides):
  c = tiny_config(results, results, run_name="sup", **{"training.num_steps": 80, "training.eval_every": 40,
                                                      "training.checkpoint_every": 40, "training.log_every": 20})
  c.model.decode_targets = targets
  c.training.objective = "supervised"
  c.training.decode_prompt = "neuron"
  c.training.best_metric = "decode_score"
  c.training.warmup_fraction = 0.05
  c.model.max_bins = T
  return apply_overrides(c, overrides)


def _test_scores(config, corpus):
  run_dir = train.run_dir_of(config)
  targets = heads.parse_targets(config.model.decode_targets)
  return finetune._evaluate_head(config, run_dir, corpus, targets)  # pylint: disable=protected-access


# ------------------------------------------------------------------------------------------------ numerics


def test_balanced_accuracy_and_r2_by_hand():
  # 3 of class 0 (2 right), 1 of class 1 (right): accuracy 3/4, balanced (2/3 + 1) / 2 = 5/6.
  assert metrics.accuracy([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(0.75)
  assert metrics.balanced_accuracy([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(5 / 6)
  assert metrics.balanced_accuracy([1, 1, 1, 1], [0, 0, 0, 1]) == pytest.approx(0.5)  # a constant guess: chance
  # y = 1, 2, 3 (mean 2, SS_tot 2); ŷ = 1, 2, 4: SS_res 1 -> R² 0.5. The masked 4th entry is ignored.
  assert metrics.r2([1, 2, 3, 100], [1, 2, 4, -7], [True, True, True, False]) == pytest.approx(0.5)
  assert math.isnan(metrics.r2([2, 2], [1, 3]))


def test_window_means_by_hand():
  x_BxTxH = np.arange(2 * 10 * 3, dtype=np.float32).reshape(2, 10, 3)
  mask_BxT = np.array([[True] * 10, [True] * 5 + [False] * 5])
  out_BxWxH = np.asarray(heads.window_means(x_BxTxH, mask_BxT, 5)).reshape(2, 5, 3)
  np.testing.assert_allclose(out_BxWxH[0, 1], x_BxTxH[0, 2:4].mean(0))  # windows of 2 bins
  np.testing.assert_allclose(out_BxWxH[1, 2], x_BxTxH[1, 4])  # only bin 4 of window [4, 6) is real
  np.testing.assert_array_equal(out_BxWxH[1, 3:], 0.0)  # no real bin: 0


def test_batches_carry_behaviours_only_when_asked():
  corpus = _corpus()
  pairs = batches_lib.trial_index(corpus, "train")[[0, 1, 70]]
  plain = batches_lib.assemble(corpus, "train", pairs, 4)
  assert set(plain) == set(batches_lib.BATCH_KEYS)  # pretraining batches unchanged
  batch = batches_lib.assemble(corpus, "train", pairs, 4, ("choice", "block", "wheel-speed"))
  s0, s1 = corpus.sessions
  choice = s0.splits["train"].behaviour["choice"][:2].tolist() + [s1.splits["train"].behaviour["choice"][6]]
  np.testing.assert_array_equal(batch["choice"], [(c > 0) * 1 for c in choice] + [-1])  # -1: a padding row
  block = s0.splits["train"].behaviour["block"][0]
  assert heads.CLASSES["block"][batch["block"][0]] == pytest.approx(block)
  wheel = s0.splits["train"].behaviour["wheel-speed"]
  np.testing.assert_allclose(batch["wheel-speed"][0], (wheel[0] - wheel.mean()) / wheel.std(), rtol=1e-5)
  assert batch["wheel-speed_mask"][:3].all() and not batch["wheel-speed_mask"][3].any()
  np.testing.assert_array_equal(batches_lib.class_index(np.array([1.0, -1.0, 0.0]), "choice"), [1, 0, -1])


# ---------------------------------------------------------------------------------------------- learning


def test_head_decodes_choice_and_wheel_above_a_shuffled_label_control(tmp_path):
  corpus = _corpus()
  config = _supervised_config(tmp_path)
  summary = train.train_and_evaluate(config, corpus=corpus)
  assert summary["best_val"]["decode_score"] > 0.6
  real = _test_scores(config, corpus)
  control_corpus = _corpus(shuffle_fit_choice=True)
  control = _supervised_config(tmp_path, run_name="shuffled")
  train.train_and_evaluate(control, corpus=control_corpus)
  shuffled = _test_scores(control, control_corpus)
  for eid in real:
    assert real[eid]["choice_accuracy"] >= 0.9, real
    assert real[eid]["choice_balanced_accuracy"] >= 0.9
    assert real[eid]["wheel_r2"] > 0.3, real
    assert shuffled[eid]["choice_accuracy"] < 0.75, shuffled
  summary_json = json.loads((tmp_path / "sup" / "eval" / "s0" / "summary.json").read_text())
  assert summary_json["tasks"]["supervised"]["choice_accuracy"] == pytest.approx(real["s0"]["choice_accuracy"])
  saved = np.load(tmp_path / "sup" / "eval" / "s0" / "supervised.npz")
  np.testing.assert_array_equal(saved["choice_true"], corpus.sessions[0].splits["test"].behaviour["choice"])
  assert np.mean(saved["choice_pred"] == saved["choice_true"]) == pytest.approx(real["s0"]["choice_accuracy"])
  # Traces are saved in the data's units; R² of the saved arrays is the summary's.
  assert metrics.r2(saved["wheel_true"], saved["wheel_pred"], saved["wheel_mask"]) == pytest.approx(
      real["s0"]["wheel_r2"], abs=1e-4)
  np.testing.assert_allclose(saved["wheel_true"], corpus.sessions[0].splits["test"].behaviour["wheel-speed"],
                             rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- fine-tuning, NDT2, resume


@pytest.fixture(scope="module")
def pretrained(corpus_dir, tmp_path_factory):
  results = tmp_path_factory.mktemp("pre_sup")
  train.train_and_evaluate(tiny_config(corpus_dir, results, run_name="pre", **{"training.num_steps": 3,
                                                                                "training.eval_every": 3}))
  return results / "pre"


def _decode_finetune_config(results, pretrained, sessions, **overrides):
  c = load_config_module("finetune_decode").get_config()
  c.pretrained, c.data.sessions, c.results_dir, c.run_name = str(pretrained), sessions, str(results), "ftd"
  c.data.batch_size = 8
  t = c.training
  t.num_steps, t.log_every, t.eval_every, t.checkpoint_every = 4, 2, 2, 2
  c.eval.tasks, c.eval.baseline = "forward_pred", False
  return apply_overrides(c, overrides)


def test_finetune_decode_with_a_frozen_encoder_trains_the_head_alone(pretrained, tmp_path):
  run = runs.open_run(pretrained)
  seen = run.sources[0]
  config = _decode_finetune_config(tmp_path, pretrained, seen, **{"finetune.freeze_encoder": True})
  out = finetune.finetune(config)
  _, pre, _ = runs.load_params(run)
  _, ft, _ = runs.load_params(runs.open_run(tmp_path / "ftd"), "latest")
  assert heads.HEAD in ft and heads.HEAD not in pre
  eid, n = run.eids[0], run.num_neurons[0]
  for name in pre:  # the rates model, the session's stitching included, is exactly the pretrained one
    if name in ("stitch_in", "stitch_out", "embed_session"):  # one row per session: the fine-tuned one is row 0
      np.testing.assert_array_equal(ft[name]["bias" if name != "embed_session" else "embedding"][0][:n],
                                    pre[name]["bias" if name != "embed_session" else "embedding"][0][:n])
      np.testing.assert_array_equal(ft["stitch_in"]["kernel"][0, :n], pre["stitch_in"]["kernel"][0, :n])
    else:
      jax.tree.map(np.testing.assert_array_equal, ft[name], pre[name])
  task = out["eval"][eid]["tasks"][supervised.TASK]
  for key in ("choice_accuracy", "choice_balanced_accuracy", "choice_chance", "block_accuracy",
              "block_balanced_accuracy", "wheel_r2", "whisker_r2", "decode_score"):
    assert key in task and task[key] is not None and math.isfinite(task[key]), (key, task)
  written = json.loads((tmp_path / "ftd" / "eval" / eid / "summary.json").read_text())
  assert written["tasks"][supervised.TASK]["block_accuracy"] == pytest.approx(task["block_accuracy"])
  assert "forward_pred" in written["tasks"] and (tmp_path / "ftd" / "eval" / eid / "supervised.npz").exists()
  assert checkpoint_metric(tmp_path / "ftd") == "decode_score"



def test_encoder_trainable_with_a_head():
  params = {"projection": {"kernel": 0}, "stitch_in": {"kernel": 0}, heads.HEAD: {"readouts": {"choice": 0}}}
  frozen = finetune.encoder_trainable(params, True, ("stitch_in",))
  assert frozen == {"projection": {"kernel": False}, "stitch_in": {"kernel": False},
                    heads.HEAD: {"readouts": {"choice": True}}}  # the head alone
  assert all(jax.tree.leaves(finetune.encoder_trainable(params, False, ("stitch_in",))))
  del params[heads.HEAD]  # masked-modelling fine-tuning: a frozen encoder still trains the session rows
  assert finetune.encoder_trainable(params, True, ("stitch_in",)) == {"projection": {"kernel": False},
                                                                      "stitch_in": {"kernel": True}}


def checkpoint_metric(run_dir: Path) -> str:
  return json.loads((run_dir / "summary.json").read_text())["best_metric"]


def test_frozen_head_on_an_unseen_session_is_refused_in_one_line(pretrained, corpus_dir, tmp_path):
  config = _decode_finetune_config(tmp_path, pretrained, str(corpus_dir / "test_eids.txt"),
                                   **{"finetune.freeze_encoder": True})
  with pytest.raises(UserError, match="no stitching for session .* fine-tune on it with masked modelling first"):
    finetune.finetune(config)


def _ndt2_supervised_config(results, **overrides):
  c = load_config_module("ndt2").get_config()
  c.results_dir, c.run_name = str(results), "ndt2"
  c.data.batch_size = 8
  c.model.update(patch_neurons=4, patch_bins=2, hidden_size=16, num_layers=1, num_heads=2, mlp_size=32,
                 max_bins=T, max_neurons=N)
  c.model.decode_targets = "block,wheel-speed"
  t = c.training
  t.objective, t.best_metric, t.num_steps, t.learning_rate = "supervised", "decode_score", 8, 1e-2
  t.log_every, t.eval_every, t.checkpoint_every = 1, 4, 8
  return apply_overrides(c, overrides)


def test_ndt2_head_trains_and_is_scored(tmp_path):
  corpus = _corpus()
  config = _ndt2_supervised_config(tmp_path)
  summary = train.train_and_evaluate(config, corpus=corpus)
  assert summary["completed"] and math.isfinite(summary["best_val"]["decode_score"])
  losses = [json.loads(line)["loss"] for line in (tmp_path / "ndt2" / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"]
  assert len(losses) == 8 and np.mean(losses[-2:]) < np.mean(losses[:2])  # it learns
  scores = _test_scores(config, corpus)
  assert {"block_accuracy", "block_balanced_accuracy", "wheel_r2"} <= set(scores["s0"])
  assert scores["s0"]["wheel_r2"] > 0  # the wheel drives 4 of 12 neurons: even 8 steps beat the mean


def test_resumed_supervised_run_reproduces_the_uninterrupted_one(tmp_path):
  corpus = _corpus()
  # The head test's schedule (80 steps: its compiled step is reused), stopped after 6 steps, or after 3 and 3 more.
  train.train_and_evaluate(_supervised_config(tmp_path, run_name="full", **{"training.stop_after": 6,
                                                                            "training.log_every": 1}), corpus=corpus)
  part = _supervised_config(tmp_path, run_name="part", **{"training.stop_after": 3, "training.log_every": 1})
  first = train.train_and_evaluate(part, corpus=corpus)
  assert first["steps"] == 3 and not first["completed"]
  part.training.stop_after = 6
  second = train.train_and_evaluate(part, corpus=corpus)
  assert second["start_step"] == 3 and second["steps"] == 6

  def curve(name):
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in sorted(rows, key=lambda r: r["step"]) if r["kind"] == "train"]

  assert len(curve("full")) == 6
  np.testing.assert_allclose(curve("part"), curve("full"), rtol=1e-6)
  _, full, _ = runs.load_params(runs.open_run(tmp_path / "full"), "latest")
  _, resumed, _ = runs.load_params(runs.open_run(tmp_path / "part"), "latest")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), full, resumed)


# ------------------------------------------------------------------------ the paper's protocol, baselines


def test_reduced_rank_regression_recovers_a_rank_one_map_and_refuses_higher_rank():
  rng = np.random.default_rng(0)
  X_KxF = rng.normal(size=(200, 12))
  W_FxT = np.outer(rng.normal(size=12), rng.normal(size=6)) + 0.5 * np.outer(rng.normal(size=12),
                                                                             rng.normal(size=6))  # rank 2
  Y_KxT = X_KxF @ W_FxT + 3.0
  W2, b2 = decoding.reduced_rank_regression(X_KxF, Y_KxT, 2, 1e-8)
  np.testing.assert_allclose(X_KxF @ W2 + b2, Y_KxT, atol=1e-5)
  W1, _ = decoding.reduced_rank_regression(X_KxF, Y_KxT, 1, 1e-8)
  assert np.linalg.matrix_rank(W1, tol=1e-8) == 1


def test_paper_protocol_decodes_from_flattened_log_rates_and_baselines_are_scored():
  session = _decodable_session(np.random.default_rng(1), "p", 0)
  fit = {k: np.concatenate([session.splits[s].behaviour[k] for s in ("train", "val")]) for k in ("choice",
                                                                                                    "wheel-speed")}
  test = session.splits["test"].behaviour
  rates = lambda s: session.splits[s].true_rates.astype(np.float64)
  log_fit, log_test = np.log(np.concatenate([rates("train"), rates("val")])), np.log(rates("test"))
  scores, preds = decoding.decode_behaviour(log_fit, fit, log_test, test, protocol="paper")
  # The true log-rates hold both; the wheel through a log (rates are linear in it), so a linear map is not exact.
  assert scores["choice_accuracy"] == 1.0 and scores["wheel_r2"] > 0.7
  assert preds["wheel_pred"].shape == test["wheel-speed"].shape
  spikes_fit = np.concatenate([session.splits[s].spikes for s in ("train", "val")])
  base, _ = decoding.spike_baselines(spikes_fit, fit, session.splits["test"].spikes, test, protocol="paper")
  assert base["spikes_choice_accuracy"] > 0.9 and 0.3 < base["rrr_wheel_r2"] < 1.0
  with pytest.raises(UserError, match="eval.decoding='nope'"):
    decoding.decode_behaviour(log_fit, fit, log_test, test, protocol="nope")


def test_decoding_trial_filter_copies_the_session():
  session = _decodable_session(np.random.default_rng(2), "f", 0)
  keep = np.zeros(SPLIT_TRIALS["test"], bool)
  keep[:10] = True
  kept = sessions_lib.filter_trials(session, {"test": keep})
  assert kept.splits["test"].spikes.shape[0] == 10 and session.splits["test"].spikes.shape[0] == 40
  np.testing.assert_array_equal(kept.splits["test"].behaviour["choice"], session.splits["test"].behaviour["choice"][:10])


def test_paper_protocol_reads_choice_under_the_neuron_prompt_and_traces_under_the_causal_one():
  from ibl_jax import evaluate  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  session = _decodable_session(np.random.default_rng(3), "q", 0)
  for split in session.splits.values():
    split.behaviour.pop("block")  # not what this test is about; saves its decoders' time
  log_true = np.log(np.concatenate([session.splits[s].true_rates for s in ("train", "val", "test")]))
  wheel_N = np.arange(N) >= 8

  def fn(state, inputs_BxTxN, time_mask_BxT, session_idx_B, trial_idx_B, prompt_idx, causal):
    # Under the causal prompt only the wheel neurons carry information, under the neuron prompt only the others.
    x = state[trial_idx_B]
    flat = jnp.full_like(x, np.log(0.2))
    keep_N = jnp.where(causal, wheel_N, ~wheel_N)
    return jnp.where(keep_N[None, None, :], x, flat)

  predict = evaluate.make_predict(fn, jnp.asarray(log_true, jnp.float32))
  run = lambda protocol, baseline: evaluate.evaluate_session(
      predict, session, 0, N, ["behaviour"], None, chunk_size=8, progress=False, decoding=protocol,
      baseline=baseline)["tasks"]["behaviour"]
  paper, ours = run("paper", True), run("ours", False)
  assert paper["protocol"] == "paper" and paper["choice_accuracy"] >= 0.9
  assert paper["wheel_r2"] > 0.5 > ours["wheel_r2"], (paper, ours)  # ours reads the wheel under the neuron prompt
  for key in ("spikes_choice_accuracy", "spikes_wheel_r2", "rrr_wheel_r2", "oracle_wheel_r2"):
    assert math.isfinite(paper[key])
  assert "spikes_choice_accuracy" not in ours  # eval.baseline=False: no raw-spike decoders


def test_linear_decoders_score_block_like_choice():
  session = _decodable_session(np.random.default_rng(4), "b", 0)
  for split in session.splits.values():  # make block decodable: it scales the choice neurons' baseline
    split.true_rates = split.true_rates.copy()
    split.true_rates[:, :, :3] += 2.0 * split.behaviour["block"][:, None, None]
  fit = {k: np.concatenate([session.splits[s].behaviour[k] for s in ("train", "val")]) for k in ("choice", "block")}
  rates_fit = np.concatenate([session.splits[s].true_rates for s in ("train", "val")]).astype(np.float64)
  scores, preds = decoding.decode_behaviour(rates_fit, fit, session.splits["test"].true_rates.astype(np.float64),
                                            session.splits["test"].behaviour)
  assert scores["block_accuracy"] == 1.0
  np.testing.assert_allclose(preds["block_pred"], session.splits["test"].behaviour["block"])  # in the data's values
