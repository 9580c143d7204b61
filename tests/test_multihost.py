"""Multi-process training on JAX's distributed runtime (two local CPU processes) and FSDP mesh shapes.

(a) 2 processes × 2 CPU devices reach the losses of 1 process × 4 devices; (b) the 2-process checkpoint
resumes in 1 process; (c) meshes (8,1), (4,2), (2,4) give the same losses; (d) evaluation sharded over 4
devices, in 1 or 2 processes, equals 1 device's, and only process 0 writes.
"""

import json
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO

TINY = ["--config.model.num_layers=1", "--config.model.hidden_size=16", "--config.model.n_channels=16",
        "--config.model.mlp_size=32", "--config.model.num_heads=2", "--config.data.batch_size=8",
        "--config.training.log_every=1", "--config.training.eval_every=3", "--config.training.checkpoint_every=3",
        "--config.training.eval_batches=1", "--config.training.quick_cosmooth_neurons=4"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _train_cmd(corpus_dir, results, run_name, steps, *extra):
  return [sys.executable, "-m", "ibl_jax.train", "--config=configs/ndt1.py",
          f"--config.data.sessions={corpus_dir / 'train_eids.txt'}", f"--config.results_dir={results}",
          f"--config.run_name={run_name}", f"--config.training.num_steps={steps}", *TINY, *extra]


def _losses(run_dir):
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def _env(base, devices):
  return {**base, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


@pytest.fixture(scope="module")
def two_process_run(corpus_dir, tmp_path_factory, subprocess_env):
  results = tmp_path_factory.mktemp("mh")
  port = _free_port()
  procs = [subprocess.Popen(
      _train_cmd(corpus_dir, results, "two", 6, f"--config.distributed.coordinator=localhost:{port}",
                 "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
      cwd=REPO, env=_env(subprocess_env, 2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = []
  for p in procs:
    try:
      outputs.append(p.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("two-process training did not finish in 300 s")
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
  one = subprocess.run(_train_cmd(corpus_dir, results, "one", 6), cwd=REPO, env=_env(subprocess_env, 4),
                       capture_output=True, text=True, timeout=300)
  assert one.returncode == 0, one.stderr[-3000:]
  return results


def test_two_processes_match_one_process_with_the_same_devices(two_process_run):
  two, one = _losses(two_process_run / "two"), _losses(two_process_run / "one")
  assert sorted(two) == list(range(1, 7))
  np.testing.assert_allclose([two[s] for s in range(1, 7)], [one[s] for s in range(1, 7)], rtol=2e-5, atol=0)  # relative: the default loss is a sum
  summary = json.loads((two_process_run / "two" / "summary.json").read_text())
  assert summary["processes"] == 2 and summary["devices"] == 4
  # Process 0 alone wrote the logs: one events file, one summary.
  assert len(list((two_process_run / "two" / "tb").iterdir())) == 1


def test_two_process_checkpoint_resumes_in_one_process(two_process_run, corpus_dir, subprocess_env):
  out = subprocess.run(_train_cmd(corpus_dir, two_process_run, "two", 9), cwd=REPO, env=_env(subprocess_env, 1),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resuming" in out.stderr and "from step 6" in out.stderr
  summary = json.loads((two_process_run / "two" / "summary.json").read_text())
  assert summary["start_step"] == 6 and summary["steps"] == 9 and summary["processes"] == 1


MESHES = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, "tests")
    import jax, jax.numpy as jnp, numpy as np
    from conftest import tiny_config
    from ibl_jax import optim, parallel, steps as steps_lib
    from ibl_jax.data import batches
    from ibl_jax.data.sessions import load_corpus
    corpus_dir = sys.argv[1]
    config = tiny_config(corpus_dir, "/tmp")
    corpus = load_corpus(corpus_dir + "/train_eids.txt")
    model = steps_lib.build_model(config.model, num_sessions=len(corpus.sessions), n_max=corpus.n_max)
    graphdef, params0 = steps_lib.split_params(model)
    params0 = jax.device_get(params0)  # host copies: donation must never delete the originals

    def train3(tx, mesh, p_shard, o_shard):  # three train steps from params0: losses, params, optimiser state
      steps = steps_lib.Steps(graphdef=graphdef, tx=tx, masking_cfg=config.masking)
      fns = steps_lib.compiled(steps, param_sharding=p_shard, opt_sharding=o_shard,
                               batch_sharding=parallel.batch_sharding(mesh), replicated=parallel.replicated(mesh))
      params = jax.device_put(params0, p_shard)
      opt = jax.jit(tx.init, out_shardings=o_shard)(params)
      it = batches.BatchIterator(corpus, "train", 16, seed=0)
      losses = []
      for i in range(3):
        params, opt, m = fns["train_step"](params, opt, parallel.global_batch(next(it), mesh), jnp.int32(i),
                                           jax.random.key(0))
        losses.append(float(m["loss"]))
      return losses, params, opt

    tx = optim.make_optimizer(config.training)
    out = {}
    for data, fsdp in ((8, 1), (4, 2), (2, 4)):
      mesh = parallel.make_mesh(data, fsdp)
      p_shard = parallel.param_shardings(params0, mesh, min_size=64)
      o_shard = parallel.param_shardings(jax.eval_shape(tx.init, params0), mesh, min_size=64)
      losses, params, _ = train3(tx, mesh, p_shard, o_shard)
      sharded = sum(1 for x in jax.tree.leaves(params) if not x.sharding.is_fully_replicated)
      out[f"{data}x{fsdp}"] = {"losses": losses, "sharded_leaves": sharded}
    # Lazy session rows, their tables replicated or split over all 8 devices (train.py's default).
    rows = optim.session_leaves(params0, config.model, len(corpus.sessions))
    tx = optim.make_optimizer(config.training, session_rows=rows)
    mesh = parallel.make_mesh(8, 1)
    for name, table_rows in (("rows-replicated", None), ("rows-sharded", rows)):
      o_abstract = jax.eval_shape(tx.init, params0)
      p_shard = parallel.param_shardings(params0, mesh, session_rows=table_rows)
      o_shard = parallel.param_shardings(o_abstract, mesh, session_rows=optim.state_session_rows(o_abstract, table_rows))
      losses, params, opt = train3(tx, mesh, p_shard, o_shard)
      sharded = [x.shape for x in jax.tree.leaves((params, opt)) if not x.sharding.is_fully_replicated]
      splits = [(list(x.shape), [None if a is None else str(a) for a in x.sharding.spec])
                for x in jax.tree.leaves(params) if not x.sharding.is_fully_replicated]
      table = jax.ShapeDtypeStruct((4, 16, 24), np.float32)  # [S, in, out], out the larger: split "in"
      splits.append(([4, 16, 24], [None if a is None else str(a) for a in parallel.param_shardings(
          {"t": table}, mesh, session_rows={"t": True})["t"].spec]))
      out[name] = {"losses": losses, "sharded_leaves": sharded, "sessions": len(corpus.sessions), "splits": splits,
                   "stitch_in": list(params0["stitch_in"]["kernel"].shape),
                   "params": [np.asarray(x).tolist() for x in jax.tree.leaves(params["stitch_in"])]}
    print(json.dumps(out))
""")


def test_fsdp_mesh_shapes_agree(corpus_dir, subprocess_env):
  out = subprocess.run([sys.executable, "-c", MESHES, str(corpus_dir)], cwd=REPO, env=subprocess_env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  assert res["8x1"]["sharded_leaves"] == 0 and res["4x2"]["sharded_leaves"] > 0 and res["2x4"]["sharded_leaves"] > 0
  for shape in ("4x2", "2x4"):
    np.testing.assert_allclose(res[shape]["losses"], res["8x1"]["losses"], rtol=2e-5, atol=0)
  # Per-session tables split over the devices: each stitcher and its two moments, nothing else; same training.
  split = res["rows-sharded"]["sharded_leaves"]
  assert res["rows-replicated"]["sharded_leaves"] == [] and split.count(res["rows-sharded"]["stitch_in"]) == 3
  assert all(shape[0] == res["rows-sharded"]["sessions"] for shape in split), split
  # Each table is split along its first axis after the sessions that the 8 devices divide (row 45 of
  # docs/performance.md: the gathered rows keep their last axis whole).
  for shape, spec in res["rows-sharded"]["splits"]:
    want = next(d for d in range(1, len(shape)) if shape[d] % 8 == 0)
    assert [d for d, axes in enumerate(spec) if axes is not None] == [want], (shape, spec)
  np.testing.assert_allclose(res["rows-sharded"]["losses"], res["rows-replicated"]["losses"], rtol=2e-5, atol=0)
  for got, want in zip(res["rows-sharded"]["params"], res["rows-replicated"]["params"]):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


EVAL_ON_MESH = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=" + sys.argv[2]
    sys.path.insert(0, "tests")
    import jax, numpy as np
    from conftest import tiny_config
    from ibl_jax import evaluate, parallel, steps as steps_lib
    from ibl_jax.data.sessions import load_corpus
    corpus = load_corpus(sys.argv[1] + "/train_eids.txt", with_true_rates=True)
    config = tiny_config(sys.argv[1], "/tmp")
    graphdef, params = steps_lib.split_params(
        steps_lib.build_model(config.model, num_sessions=len(corpus.sessions), n_max=corpus.n_max, seed=1))
    mesh = parallel.make_mesh()
    predict = evaluate.model_predict(graphdef, jax.device_get(params), mesh)
    s = corpus.sessions[0]
    out = evaluate.evaluate_session(predict, s, 0, corpus.n_max, "co_smooth,inter_region", None, chunk_size=8,
                                    progress=False)
    print(json.dumps({"devices": mesh.devices.size, "bps": [out["tasks"][t]["bps_per_neuron"]
                                                             for t in ("co_smooth", "inter_region")]}))
""")


def test_evaluation_sharded_over_four_devices_matches_one(corpus_dir, subprocess_env):
  res = {}
  for n in ("1", "4"):
    out = subprocess.run([sys.executable, "-c", EVAL_ON_MESH, str(corpus_dir), n], cwd=REPO, env=subprocess_env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res[n] = json.loads(out.stdout.strip().splitlines()[-1])
  assert res["4"]["devices"] == 4
  np.testing.assert_allclose(res["4"]["bps"], res["1"]["bps"], atol=1e-5)


EVAL_RUN = textwrap.dedent("""
    import json, sys
    import jax
    from ml_collections import config_dict
    from ibl_jax import evaluate, parallel
    run_dir, out_dir, port, num_processes, process_id = sys.argv[1:6]
    if int(num_processes) > 1:
      parallel.initialize_distributed(config_dict.ConfigDict(dict(
          coordinator=f"localhost:{port}", num_processes=int(num_processes), process_id=int(process_id))))
    res = evaluate.evaluate_run(run_dir, tasks="co_smooth,inter_region", out_dir=out_dir, chunk_size=0,
                                figures=False, progress=False)
    print(json.dumps({"devices": jax.device_count(), "bps": {e: [s["tasks"][t]["bps_per_neuron"]
                      for t in ("co_smooth", "inter_region")] for e, s in res.items()}}))
""")


def test_evaluation_in_two_processes_matches_one_and_process_0_writes(two_process_run, subprocess_env, tmp_path):
  run_dir, port = two_process_run / "one", str(_free_port())
  cmd = lambda out, n, i: [sys.executable, "-c", EVAL_RUN, str(run_dir), str(tmp_path / out), port, str(n), str(i)]
  procs = [subprocess.Popen(cmd(f"two{i}", 2, i), cwd=REPO, env=_env(subprocess_env, 2), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for i, (p, (_, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} failed:\n{err[-3000:]}"
  one = subprocess.run(cmd("one", 1, 0), cwd=REPO, env=_env(subprocess_env, 4), capture_output=True, text=True,
                       timeout=300)
  assert one.returncode == 0, one.stderr[-3000:]
  results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs] + [json.loads(one.stdout.splitlines()[-1])]
  assert [r["devices"] for r in results] == [4, 4, 4]
  for r in results[:2]:
    assert r["bps"].keys() == results[2]["bps"].keys()
    for eid, bps in r["bps"].items():
      np.testing.assert_allclose(bps, results[2]["bps"][eid], atol=1e-6, err_msg=eid)
  npz = lambda out: sorted(p.relative_to(tmp_path / out) for p in (tmp_path / out).rglob("*.npz"))
  assert npz("two0") == npz("one") and len(npz("one")) == 2 * len(results[2]["bps"])
  assert not (tmp_path / "two1").exists()  # each process got its own out_dir: process 1 wrote nothing
