"""Fine-tuning: the encoder is restored bit for bit, rows are added only for new sessions, freezing freezes."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from ibl_jax import checkpoint, finetune, runs, train
from ibl_jax.models import ndt1

from conftest import apply_overrides, load_config_module, tiny_config


@pytest.fixture(scope="module")
def pretrained(corpus_dir, tmp_path_factory):
  results = tmp_path_factory.mktemp("pre")
  train.train_and_evaluate(tiny_config(corpus_dir, results, run_name="pre", **{"training.num_steps": 6}))
  return results / "pre"


def _finetune_config(corpus_dir, results, pretrained, sessions, config="finetune", **overrides):
  c = load_config_module(config).get_config()
  c.pretrained = str(pretrained)
  c.data.sessions = sessions
  c.results_dir = str(results)
  c.run_name = "ft"
  c.data.batch_size = 8
  t = c.training
  t.num_steps, t.log_every, t.eval_every, t.checkpoint_every, t.eval_batches, t.quick_cosmooth_neurons = 3, 1, 3, 3, 1, 4
  c.eval.tasks = "co_smooth"
  c.eval.figures = False
  return apply_overrides(c, overrides)


def _eids(path):
  return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def test_transplant_restores_the_encoder_and_adds_rows_only_for_new_sessions(pretrained, corpus_dir):
  run = runs.open_run(pretrained)
  _, pre_params, _ = runs.load_params(run)
  seen, new = run.eids[1], _eids(corpus_dir / "test_eids.txt")[0]
  from ibl_jax import steps as steps_lib
  n_max = max(run.n_max, 40)  # the new session may have more neurons: padding grows
  fresh = steps_lib.split_params(steps_lib.build_model(run.config.model, num_sessions=2, n_max=n_max, seed=7))[1]
  out = finetune.transplant(fresh, pre_params, pretrained_eids=run.eids, target_eids=[new, seen],
                            session_params=ndt1.SESSION_PARAMS)
  for name in out:
    if name not in ndt1.SESSION_PARAMS:
      jax.tree.map(np.testing.assert_array_equal, out[name], jax.tree.map(np.asarray, pre_params[name]))
  n_seen = run.num_neurons[1]
  k_in = np.asarray(out["stitch_in"]["kernel"])
  np.testing.assert_array_equal(k_in[1, :n_seen], np.asarray(pre_params["stitch_in"]["kernel"])[1, :n_seen])
  np.testing.assert_array_equal(k_in[0], np.asarray(fresh["stitch_in"]["kernel"])[0])  # the new session: fresh
  np.testing.assert_array_equal(np.asarray(out["embed_session"]["embedding"])[1],
                                np.asarray(pre_params["embed_session"]["embedding"])[1])
  k_out = np.asarray(out["stitch_out"]["kernel"])
  np.testing.assert_array_equal(k_out[1, :, :n_seen], np.asarray(pre_params["stitch_out"]["kernel"])[1, :, :n_seen])


def test_frozen_encoder_is_unchanged_after_fine_tuning_and_eval_is_written(pretrained, corpus_dir, tmp_path):
  config = _finetune_config(corpus_dir, tmp_path, pretrained, str(corpus_dir / "test_eids.txt"),
                            **{"finetune.freeze_encoder": True})
  out = finetune.finetune(config)
  assert out["train"]["steps"] == 3
  _, pre_params, _ = runs.load_params(runs.open_run(pretrained))
  _, ft_params, _ = runs.load_params(runs.open_run(tmp_path / "ft"), "latest")
  for name in ft_params:
    if name not in ndt1.SESSION_PARAMS:
      jax.tree.map(np.testing.assert_array_equal, ft_params[name], pre_params[name])
  new = _eids(corpus_dir / "test_eids.txt")[0]
  summary = json.loads((tmp_path / "ft" / "eval" / new / "summary.json").read_text())
  assert "co_smooth" in summary["tasks"] and (tmp_path / "ft" / "eval" / new / "co_smooth.npz").exists()


def test_unfrozen_fine_tuning_moves_the_encoder_and_scratch_baseline_runs(pretrained, corpus_dir, tmp_path):
  sessions = str(corpus_dir / "test_eids.txt")
  finetune.finetune(_finetune_config(corpus_dir, tmp_path, pretrained, sessions, run_name="ft_all"))
  _, pre_params, _ = runs.load_params(runs.open_run(pretrained))
  _, ft_params, _ = runs.load_params(runs.open_run(tmp_path / "ft_all"), "latest")
  assert not np.array_equal(np.asarray(ft_params["projection"]["kernel"]),
                            np.asarray(pre_params["projection"]["kernel"]))
  # The from-scratch recipe: the default small architecture (shrunk here) with its dropout and the mean loss.
  scratch = finetune.finetune(_finetune_config(corpus_dir, tmp_path, "", sessions, config="finetune_scratch",
                                               run_name="scratch",
                                               **{"model.hidden_size": 16, "model.num_layers": 1,
                                                  "model.n_channels": 16, "model.mlp_size": 32, "model.num_heads": 2}))
  assert scratch["train"]["steps"] == 3 and len(scratch["eval"]) == 1
  saved = json.loads((tmp_path / "scratch" / "config.json").read_text())
  assert (saved["model"]["dropout"], saved["model"]["embed_dropout"], saved["model"]["hidden_size"]) == (0.2, 0.1, 16)
  assert saved["model"]["num_prompts"] == 4 and saved["training"]["loss_reduction"] == "mean"  # defaults filled in


def test_architecture_mismatch_names_both_values(pretrained, corpus_dir, tmp_path):
  config = _finetune_config(corpus_dir, tmp_path, pretrained, str(corpus_dir / "test_eids.txt"),
                            **{"model.hidden_size": 32})
  with pytest.raises(ValueError, match=r"config.model.hidden_size=32 but the pretrained checkpoint has hidden_size=16"):
    finetune.finetune(config)


def test_pretrained_step_path_loads_that_step_not_best(pretrained, corpus_dir, tmp_path, capsys):
  steps = checkpoint.Checkpointer(pretrained / "checkpoints", read_only=True).all_steps()
  assert steps == [3, 6]
  config = _finetune_config(corpus_dir, tmp_path, pretrained / "checkpoints" / "3", str(corpus_dir / "test_eids.txt"),
                            run_name="ft_step3", **{"finetune.freeze_encoder": True, "training.num_steps": 1,
                                                     "training.eval_every": 1, "training.checkpoint_every": 1})
  finetune.finetune(config)
  assert "step 3)" in capsys.readouterr().err
  _, at3, _ = runs.load_params(runs.open_run(pretrained), 3)
  _, at6, _ = runs.load_params(runs.open_run(pretrained), 6)
  _, ft, _ = runs.load_params(runs.open_run(tmp_path / "ft_step3"), "latest")
  kernel = lambda p: np.asarray(p["projection"]["kernel"])
  np.testing.assert_array_equal(kernel(ft), kernel(at3))  # frozen encoder: exactly the named step's
  assert not np.array_equal(kernel(at3), kernel(at6))


def test_rerun_of_a_finished_fine_tuning_is_complete_and_reuses_its_evaluation(pretrained, corpus_dir, tmp_path):
  config = _finetune_config(corpus_dir, tmp_path, pretrained, str(corpus_dir / "test_eids.txt"), run_name="ft_rerun",
                            **{"training.num_steps": 1, "training.eval_every": 1, "training.checkpoint_every": 1})
  first = finetune.finetune(config)
  summary_path = tmp_path / "ft_rerun" / "eval" / _eids(corpus_dir / "test_eids.txt")[0] / "summary.json"
  written = summary_path.stat().st_mtime_ns
  again = finetune.finetune(config)
  assert again["train"]["already_complete"] and summary_path.stat().st_mtime_ns == written  # not evaluated again
  assert sorted(again["eval"]) == sorted(first["eval"])
  for eid, s in first["eval"].items():
    assert again["eval"][eid]["tasks"]["co_smooth"]["bps_per_neuron"] == pytest.approx(
        s["tasks"]["co_smooth"]["bps_per_neuron"])
