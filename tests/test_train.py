"""Pretraining: the loss falls, one compilation, checkpoints restore exactly, resume replays, sharding agrees."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibl_jax import checkpoint, masking, optim, steps as steps_lib, train
from ibl_jax.data import batches as batches_lib
from ibl_jax.data.sessions import load_corpus

from conftest import tiny_config


def _steps_and_state(config, corpus):
  model = steps_lib.build_model(config.model, num_sessions=len(corpus.sessions), n_max=corpus.n_max, seed=0)
  graphdef, params = steps_lib.split_params(model)
  tx = optim.make_optimizer(config.training)
  return steps_lib.Steps(graphdef=graphdef, tx=tx, masking_cfg=config.masking), params, tx.init(params)


@pytest.fixture(scope="module")
def corpus(corpus_dir):
  return load_corpus(str(corpus_dir / "train_eids.txt"), with_true_rates=True)


@pytest.fixture(scope="module")
def tiny(corpus, corpus_dir, tmp_path_factory):
  """One compiled train step (no dropout, neuron masking) shared by the tests below."""
  config = tiny_config(corpus_dir, tmp_path_factory.mktemp("r"), **{
      "masking.scheme": "neuron", "model.dropout": 0.0, "model.embed_dropout": 0.0,
      "model.attention_dropout": 0.0, "training.num_steps": 60})
  steps, params, opt_state = _steps_and_state(config, corpus)
  return steps, params, opt_state, jax.jit(steps.train_step)


def test_loss_falls_on_a_fixed_batch(corpus, tiny):
  _, params, opt_state, step_fn = tiny
  batch = next(batches_lib.BatchIterator(corpus, "train", 8, seed=0))
  key = jax.random.key(0)
  losses = []
  for i in range(60):
    params, opt_state, m = step_fn(params, opt_state, batch, jnp.int32(i % 2), key)  # two fixed masks
    losses.append(float(m["loss"]))
  assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:4]), losses
  assert step_fn._cache_size() == 1  # both masks (and every step) share one compilation


def test_train_run_compiles_once_across_sessions_and_schemes(corpus_dir, tmp_path):
  config = tiny_config(corpus_dir, tmp_path, **{"training.num_steps": 12, "training.eval_every": 12})
  summary = train.train_and_evaluate(config)
  run = tmp_path / "tiny"
  log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in log if r["kind"] == "train"]
  schemes_seen = {k.split("/")[1] for r in train_rows for k in r if k.startswith("loss/")}
  assert len(schemes_seen) >= 3, schemes_seen  # 12 steps of mtm: several schemes were sampled
  assert summary["train_step_compilations"] == 1
  assert summary["steps"] == 12 and summary["devices"] == jax.device_count()
  assert np.isfinite(summary["final_train_loss"]) and "cosmooth_bps" in summary["final_val"]
  assert set(summary["final_val"]) >= {f"val_loss/{s}" for s in masking.MTM_SCHEMES}
  saved = json.loads((run / "summary.json").read_text())
  assert saved["final_train_loss"] == summary["final_train_loss"]
  assert (run / "config.json").exists() and list((run / "tb").iterdir())
  assert (run / "figures" / "val_heldout_rates.png").exists()
  corpus_json = json.loads((run / "corpus.json").read_text())
  assert len(corpus_json["eids"]) == 3 and corpus_json["region_vocab"] == sorted(corpus_json["region_vocab"])


def test_checkpoint_restores_identical_params_and_next_step_loss(corpus, tiny, tmp_path):
  _, params, opt_state, step_fn = tiny
  it = batches_lib.BatchIterator(corpus, "train", 8, seed=0)
  key = jax.random.key(3)
  for i in range(2):
    params, opt_state, _ = step_fn(params, opt_state, next(it), jnp.int32(i), key)
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", keep=2)
  ckpt.save(2, params=params, opt_state=opt_state, meta={"step": 2, "data_state": it.state()},
            metrics={"val_loss": 1.0})
  ckpt.close()
  batch = next(it)
  _, _, expected = step_fn(params, opt_state, batch, jnp.int32(2), key)

  shard = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # as the originals: no recompilation
  restored = checkpoint.Checkpointer(tmp_path / "ckpt", keep=2, read_only=True)
  p2, o2, meta = restored.restore(2, abstract_params=checkpoint.abstract_with_shardings(params, shard(params)),
                                  abstract_opt_state=checkpoint.abstract_with_shardings(opt_state,
                                                                                        shard(opt_state)))
  assert meta["data_state"] == {"epoch": 0, "position": 16}
  jax.tree.map(np.testing.assert_array_equal, p2, params)
  jax.tree.map(np.testing.assert_array_equal, o2, opt_state)
  _, _, got = step_fn(p2, o2, batch, jnp.int32(2), key)
  assert float(got["loss"]) == float(expected["loss"])


def test_best_and_latest_checkpoints_are_kept(tmp_path):
  params = {"w": jnp.ones(3)}
  ckpt = checkpoint.Checkpointer(tmp_path / "c", keep=1)
  for step, val in ((1, 3.0), (2, 1.0), (3, 2.0), (4, 4.0)):
    ckpt.save(step, params=params, opt_state={"m": jnp.zeros(1)}, meta={"step": step}, metrics={"val_loss": val}, force=True)
  ckpt.close()
  reopened = checkpoint.Checkpointer(tmp_path / "c", keep=1, read_only=True)
  assert reopened.all_steps() == [2, 4]  # best (lowest val_loss) and latest
  assert checkpoint.resolve_step(reopened, "best") == 2 and checkpoint.resolve_step(reopened, "latest") == 4


def test_resumed_run_reproduces_the_uninterrupted_loss_curve(corpus_dir, tmp_path):
  full = tiny_config(corpus_dir, tmp_path, run_name="full")
  train.train_and_evaluate(full)
  part = tiny_config(corpus_dir, tmp_path, run_name="part", **{"training.stop_after": 4})
  first = train.train_and_evaluate(part)
  assert first["steps"] == 4 and not first["completed"]
  part.training.stop_after = None
  second = train.train_and_evaluate(part)
  assert second["start_step"] == 4 and second["completed"]

  def curve(name):
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}

  full_curve, part_curve = curve("full"), curve("part")
  assert sorted(part_curve) == list(range(1, 7))
  np.testing.assert_allclose([part_curve[s] for s in range(1, 7)], [full_curve[s] for s in range(1, 7)],
                             rtol=1e-6)


def test_sigterm_saves_and_exits_zero(corpus_dir, tmp_path, subprocess_env):
  config_args = [f"--config.data.sessions={corpus_dir / 'train_eids.txt'}", f"--config.results_dir={tmp_path}",
                 "--config.run_name=pre", "--config.training.num_steps=100000", "--config.training.log_every=1",
                 "--config.model.num_layers=1", "--config.model.hidden_size=16", "--config.model.n_channels=16",
                 "--config.model.mlp_size=32", "--config.model.num_heads=2", "--config.data.batch_size=8"]
  proc = subprocess.Popen([sys.executable, "-m", "ibl_jax.train", "--config=configs/ndt1.py", *config_args],
                          cwd=train.Path(__file__).resolve().parents[1], env=subprocess_env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  log = tmp_path / "pre" / "metrics.jsonl"
  deadline = time.time() + 240
  while not (log.exists() and log.read_text().count("\n") >= 3):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
    time.sleep(0.5)
  t0 = time.time()
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err[-2000:]
  assert time.time() - t0 < 30
  steps_saved = checkpoint.Checkpointer(tmp_path / "pre" / "checkpoints", read_only=True).all_steps()
  assert steps_saved and "SIGTERM" in err


FOUR_DEVICES = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    sys.path.insert(0, "tests")
    import jax, jax.numpy as jnp
    from conftest import tiny_config
    from ibl_jax import parallel, steps as steps_lib, optim
    from ibl_jax.data.sessions import load_corpus
    from ibl_jax.data import batches
    corpus_dir, n_dev = sys.argv[1], int(sys.argv[2])
    config = tiny_config(corpus_dir, "/tmp")
    corpus = load_corpus(corpus_dir + "/train_eids.txt")
    model = steps_lib.build_model(config.model, num_sessions=len(corpus.sessions), n_max=corpus.n_max)
    graphdef, params = steps_lib.split_params(model)
    tx = optim.make_optimizer(config.training)
    steps = steps_lib.Steps(graphdef=graphdef, tx=tx, masking_cfg=config.masking)
    mesh = parallel.make_mesh(data=n_dev) if n_dev == 4 else jax.sharding.Mesh(jax.devices()[:1], ("data",))
    bs = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names[0]))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    fn = jax.jit(steps.train_step, in_shardings=(rep, rep, bs, rep, rep), out_shardings=(rep, rep, rep))
    params = jax.device_put(params, rep)
    opt = jax.device_put(tx.init(params), rep)
    it = batches.BatchIterator(corpus, "train", 8, seed=0)
    losses = []
    for i in range(3):
      batch = jax.device_put(next(it), bs)
      params, opt, m = fn(params, opt, batch, jnp.int32(i), jax.random.key(0))
      losses.append(float(m["loss"]))
    print(json.dumps({"losses": losses, "shards": len(batch["spikes"].addressable_shards)}))
""")


def test_four_devices_give_the_one_device_loss(corpus_dir, subprocess_env):
  results = {}
  for n in (1, 4):
    out = subprocess.run([sys.executable, "-c", FOUR_DEVICES, str(corpus_dir), str(n)], capture_output=True,
                         text=True, env=subprocess_env, cwd=train.Path(__file__).resolve().parents[1], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results[n] = json.loads(out.stdout.strip().splitlines()[-1])
  assert results[4]["shards"] == 4 and results[1]["shards"] == 1
  np.testing.assert_allclose(results[4]["losses"], results[1]["losses"], rtol=2e-5, atol=0)  # relative: the default loss is a sum


def test_rerun_of_a_finished_run_says_complete_and_a_larger_num_steps_continues(corpus_dir, tmp_path, capsys):
  config = tiny_config(corpus_dir, tmp_path, run_name="rerun")
  handler_before = signal.getsignal(signal.SIGTERM)
  first = train.train_and_evaluate(config)
  assert signal.getsignal(signal.SIGTERM) is handler_before  # the run's SIGTERM flag does not outlive it
  assert first["steps"] == 6 and first["completed"]
  again = train.train_and_evaluate(config)  # the rerun crashed on a None format before
  assert again["already_complete"] and again["steps"] == 6
  assert "is complete (checkpoint at step 6" in capsys.readouterr().err
  line = train.done_line(again)
  assert line.startswith("already complete: 6 steps") and f"{first['final_train_loss']:.4f}" in line
  assert "train loss n/a" in train.done_line({**first, "final_train_loss": None, "final_val": {}})
  config.training.num_steps = 9
  longer = train.train_and_evaluate(config)
  assert longer["start_step"] == 6 and longer["steps"] == 9 and not longer.get("already_complete")
  assert "learning-rate schedule" in capsys.readouterr().err  # the changed schedule is announced


def test_quiet_by_default(corpus_dir, tmp_path, subprocess_env):
  """No library INFO lines (backend probing, datasets, Orbax) between our progress lines; -v brings them back."""
  def stderr_of(*extra):
    args = [f"--config.data.sessions={corpus_dir / 'train_eids.txt'}", f"--config.results_dir={tmp_path}",
            f"--config.run_name=quiet{len(extra)}", "--config.training.num_steps=2", "--config.training.eval_every=2",
            "--config.training.checkpoint_every=2", "--config.model.num_layers=1", "--config.model.hidden_size=16",
            "--config.model.n_channels=16", "--config.model.mlp_size=32", "--config.model.num_heads=2",
            "--config.data.batch_size=8", *extra]
    proc = subprocess.run([sys.executable, "-m", "ibl_jax.train", "--config=configs/ndt1.py", *args],
                          cwd=train.Path(__file__).resolve().parents[1], env=subprocess_env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr
  quiet = stderr_of()
  assert "Unable to initialize backend" not in quiet and "JAX version" not in quiet
  assert not [l for l in quiet.splitlines() if l[:1] in "IW" and l[1:5].isdigit()], quiet  # absl's I1201 ... lines
  assert "Unable to initialize backend" in stderr_of("--verbosity=0")


def test_resume_false_starts_over_in_a_run_directory_with_checkpoints(corpus_dir, tmp_path):
  config = tiny_config(corpus_dir, tmp_path, run_name="again")
  train.train_and_evaluate(config)
  config.training.resume = False
  config.training.num_steps = 3
  summary = train.train_and_evaluate(config)  # raised StepAlreadyExistsError before
  assert summary["start_step"] == 0 and summary["steps"] == 3
  assert checkpoint.Checkpointer(tmp_path / "again" / "checkpoints", read_only=True).all_steps() == [3]
