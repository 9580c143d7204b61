"""The training recipe: best checkpoint by validation co-smoothing, early stopping, the loss reduction switch."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from ibl_jax import checkpoint, losses, runs, train
from ibl_jax.errors import UserError

from conftest import tiny_config


def _val_rows(run_dir):
  rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in rows if r["kind"] == "val"}


def test_best_checkpoint_is_the_highest_validation_cosmoothing(corpus_dir, tmp_path):
  config = tiny_config(corpus_dir, tmp_path, **{"training.best_metric": "cosmooth_bps", "training.num_steps": 9,
                                                "training.keep_checkpoints": 1})
  summary = train.train_and_evaluate(config)
  val = _val_rows(tmp_path / "tiny")
  best = max(val, key=lambda s: val[s]["cosmooth_bps"])
  assert summary["best_val"]["step"] == best
  assert runs.load_params(runs.open_run(tmp_path / "tiny"))[2] == best  # evaluation and fine-tuning restore it
  ckpt = checkpoint.Checkpointer(tmp_path / "tiny" / "checkpoints", best_metric="cosmooth_bps", read_only=True)
  assert ckpt.best_step() == best  # "max" mode inferred from the metric's name
  assert set(ckpt.all_steps()) == {best, 9}  # the best and the latest survive pruning


def test_early_stopping_stops_when_validation_stops_improving_and_a_rerun_trains_no_further(corpus_dir, tmp_path):
  # A learning rate of 0 never changes the model: the second evaluation is no better than the first.
  config = tiny_config(corpus_dir, tmp_path, **{"training.best_metric": "cosmooth_bps", "training.num_steps": 30,
                                                "training.eval_every": 2, "training.checkpoint_every": 10,
                                                "training.early_stop_patience": 1, "training.learning_rate": 0.0})
  summary = train.train_and_evaluate(config)
  assert summary["early_stopped_at"] == 4 and summary["steps"] == 4 and summary["completed"]
  assert sorted(_val_rows(tmp_path / "tiny")) == [2, 4]
  again = train.train_and_evaluate(config)
  assert again["steps"] == 4 and again["early_stopped_at"] == 4 and again["already_complete"]


def test_loss_reduction_sum_is_the_mean_times_the_target_count():
  total, count = jnp.float32(12.0), jnp.float32(4.0)
  assert float(losses.reduce(total, count, "mean")) == 3.0
  assert float(losses.reduce(total, count, "sum")) == 12.0
  assert float(losses.reduce(jnp.float32(0.0), jnp.float32(0.0), "mean")) == 0.0  # no targets: 0, not NaN
  with pytest.raises(ValueError):
    losses.reduce(total, count, "max")


def test_bad_recipe_fields_are_one_line_user_errors(corpus_dir, tmp_path):
  for field, value in (("training.loss_reduction", "max"), ("training.best_metric", "r2")):
    with pytest.raises(UserError, match=field.split(".")[1]):
      train.train_and_evaluate(tiny_config(corpus_dir, tmp_path, **{field: value}))
