"""Tests of `ibl_jax.convert`: golden parity through a converted run directory, export round trip, clear errors.

The golden fixture (tests/testdata/mtm_ndt1_small) is a pickled original PyTorch NDT1 with reference outputs.
"""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax import traverse_util

from ibl_jax import convert, runs
from ibl_jax.models import ndt1

torch = pytest.importorskip("torch", reason="the converter needs PyTorch: pip install -r requirements-convert.txt")

FIXTURE = Path(__file__).resolve().parent / "testdata" / "mtm_ndt1_small"  # a copy of the shared mtm_ndt1_small fixture
MODES = ["neuron", "causal", "inter-region", "intra-region"]


@pytest.fixture(scope="module")
def golden():
  missing = [n for n in ("model_best.pt", "state_dict.npz", "io.npz") if not (FIXTURE / n).exists()]
  assert not missing, f"tests/testdata/mtm_ndt1_small is part of the repository; missing {missing}"
  state_dict = dict(np.load(FIXTURE / "state_dict.npz"))
  io = dict(np.load(FIXTURE / "io.npz"))
  return state_dict, io, [str(e) for e in io["eids"]]


def save_state_dict(path: Path, state_dict: dict, wrap: str | None = None) -> Path:
  tensors = {name: torch.from_numpy(np.asarray(v)) for name, v in state_dict.items()}
  torch.save({wrap: tensors} if wrap else tensors, path)
  return path


@pytest.fixture(scope="module")
def converted_runs(golden, tmp_path_factory):
  """Both forms of the fixture, converted: the pickled model_best.pt and a plain state dict .pt."""
  state_dict, _, eids = golden
  tmp = tmp_path_factory.mktemp("convert")
  plain = save_state_dict(tmp / "state_dict.pt", state_dict)
  out = {}
  out["pickle"] = convert.convert(FIXTURE / "model_best.pt", tmp / "from_pickle", eids=eids)
  out["state_dict"] = convert.convert(plain, tmp / "from_state_dict", eids=eids, num_heads=4)
  return out


@pytest.mark.parametrize("source", ["pickle", "state_dict"])
def test_converted_run_reproduces_the_original(golden, converted_runs, source):
  _, io, eids = golden
  run = runs.open_run(converted_runs[source])
  assert run.eids == eids and run.num_neurons == [37, 52] and run.config.model.causal_prefix == "original"
  graphdef, params, _ = runs.load_params(run)
  forward = jax.jit(lambda p, *args: nnx.merge(graphdef, p)(*args))
  worst = {}
  for session, n in enumerate(io["num_neurons"]):
    cases = [(f"N{n}_{mode}", f"spikes_N{n}", p, mode == "causal") for p, mode in enumerate(MODES)]
    cases.append((f"N{n}_neuron_heldout", f"spikes_N{n}_heldout", 0, False))
    for name, spikes_key, prompt, causal in cases:
      spikes_BxTxN = np.pad(io[spikes_key], ((0, 0), (0, 0), (0, run.n_max - n)))  # padded neurons are zero
      out = forward(params, spikes_BxTxN, io[f"time_attn_mask_N{n}"].astype(bool), jnp.full(3, session),
                    jnp.int32(prompt), jnp.bool_(causal))
      worst[name] = float(np.abs(np.asarray(out)[..., :n] - io[f"preds_{name}"]).max())  # padded bins included
  print(f"{source} parity max|diff|:", worst)
  assert len(worst) == sum(key.startswith("preds_") for key in io)
  assert max(worst.values()) < 1e-4, worst


def flat(params) -> dict:
  return traverse_util.flatten_dict(nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params)


def test_export_reproduces_the_original_and_round_trips(golden, converted_runs):
  state_dict, _, _ = golden
  run = runs.open_run(converted_runs["pickle"])
  _, params, _ = runs.load_params(run)
  exported = convert.params_to_torch_state_dict(params, run.config.model, run.num_neurons)
  assert set(exported) == set(state_dict)
  for name, value in state_dict.items():
    if name == "encoder.embedder.embed_session.weight":
      value = value[:2]  # our run holds the rows of its two sessions
    elif name.startswith("decoder."):
      value = np.zeros_like(value)  # the unused ssl head is exported as zeros
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  back = ndt1.params_from_torch_state_dict(exported, run.config.model, ["37", "52"], [0, 1])
  expected = flat(params)
  for path, value in flat(back).items():
    np.testing.assert_array_equal(value, expected[path], err_msg=str(path))


def test_export_import_round_trip_of_our_params(golden):
  cfg = convert.infer_model_config(convert.TorchCheckpoint(golden[0], {}), num_heads=4, log=lambda _: None)
  num_neurons = [20, 52, 37]
  abstract = nnx.eval_shape(lambda: ndt1.NDT1(cfg, num_sessions=3, n_max=52, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                        nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  for i, n in enumerate(num_neurons):  # padded neurons carry nothing and are not exported
    params["stitch_in"]["kernel"][i, n:] = 0
    params["stitch_out"]["kernel"][i, :, n:] = 0
    params["stitch_out"]["bias"][i, n:] = 0
  exported = convert.params_to_torch_state_dict(params, cfg, num_neurons)
  back = flat(ndt1.params_from_torch_state_dict(exported, cfg, [str(n) for n in num_neurons], [0, 1, 2]))
  assert back.keys() == flat(params).keys()
  for path, value in flat(params).items():
    np.testing.assert_array_equal(back[path], value, err_msg=str(path))
  with pytest.raises(ValueError, match="N=52"):  # the original has one stitcher per neuron count
    convert.params_to_torch_state_dict(params, cfg, [20, 52, 52])


def test_sessions_pair_eids_with_stitchers_and_rows():
  keys = {"37": 37, "52": 52}
  table = {"a": 5, "b": 1, "c": 3}
  by_order = convert.resolve_sessions(keys, table, ["a", "b"], None, log=lambda _: None)
  assert [(s.eid, s.key, s.row) for s in by_order] == [("a", "37", 5), ("b", "52", 1)]
  shared = convert.resolve_sessions(keys, None, ["a", "b", "c"], [52, 37, 52], log=lambda _: None)
  assert [(s.key, s.num_neurons, s.row) for s in shared] == [("52", 52, 0), ("37", 37, 1), ("52", 52, 2)]
  for eids, num_neurons, match in [(None, None, "pass --eids"), (["a"], None, "1 eids for 2 stitchers"),
                                   (["a", "b"], [37, 40], "no stitcher for N"), (["a", "x"], None, "x")]:
    with pytest.raises(convert.ConvertError, match=match):
      convert.resolve_sessions(keys, table, eids, num_neurons)


def broken_files(tmp: Path, state_dict: dict) -> dict[str, tuple[Path, str]]:
  """name -> (file, expected message fragment)."""
  missing = {k: v for k, v in state_dict.items() if k != "encoder.layers.1.attn.key.bias"}
  misshaped = dict(state_dict, **{"encoder.out_norm.weight": np.zeros(65, np.float32)})
  extra = dict(state_dict, **{"encoder.extra.weight": np.zeros(3, np.float32)})
  blob = (FIXTURE / "model_best.pt").read_bytes()
  (tmp / "truncated.pt").write_bytes(blob[: len(blob) // 2])
  (tmp / "notes.txt").write_text("not a checkpoint\n")
  return {
      "truncated": (tmp / "truncated.pt", "not a readable PyTorch checkpoint"),
      "text": (tmp / "notes.txt", "not a readable PyTorch checkpoint"),
      "missing": (save_state_dict(tmp / "missing.pt", missing, "state_dict"),
                  "missing encoder.layers.1.attn.key.bias"),
      "misshaped": (save_state_dict(tmp / "misshaped.pt", misshaped, "model"),
                    "param out_norm/scale: got (65,), model wants (64,)"),
      "unmapped": (save_state_dict(tmp / "extra.pt", extra), "unmapped encoder.extra.weight"),
      "absent": (tmp / "absent.pt", "no such file"),
  }


@pytest.fixture(scope="module")
def broken(golden, tmp_path_factory):
  return broken_files(tmp_path_factory.mktemp("broken"), golden[0])


@pytest.mark.parametrize("case", ["truncated", "text", "missing", "misshaped", "unmapped", "absent"])
def test_bad_inputs_give_one_line_errors(golden, broken, case, tmp_path, capsys):
  path, fragment = broken[case]
  argv = ["--from-torch", str(path), "--out", str(tmp_path / "run"), "--eids", ",".join(golden[2]),
          "--num-heads", "4"]
  assert convert.main(argv) == 2
  err = capsys.readouterr().err
  assert fragment in err and err.count("\n") == 1, err
  assert not (tmp_path / "run" / "config.json").exists()


def test_cli_exits_2_with_one_line_in_a_subprocess(golden, broken, tmp_path, subprocess_env):
  cmd = [sys.executable, "-m", "ibl_jax.convert", "--from-torch", str(broken["text"][0]), "--out",
         str(tmp_path / "run")]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env, timeout=120)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.startswith(("error", "Traceback"))]
  assert lines == [f"error: {broken['text'][0]}: not a readable PyTorch checkpoint "
                   "(UnpicklingError: invalid load key, 'n'.)"], proc.stderr


def test_without_torch_the_error_says_how_to_install(golden, tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  argv = ["--from-torch", str(FIXTURE / "model_best.pt"), "--out", str(tmp_path / "run")]
  assert convert.main(argv) == 2
  err = capsys.readouterr().err
  assert "pip install torch==2.13.0" in err and "requirements-convert.txt" in err and err.count("\n") == 1


def test_help_and_argument_errors(capsys):
  with pytest.raises(SystemExit) as exit_info:
    convert.main(["--help"])
  assert exit_info.value.code == 0 and "--num-heads" in capsys.readouterr().out
  with pytest.raises(SystemExit) as exit_info:
    convert.main(["--out", "x"])
  assert exit_info.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_refuses_to_overwrite_a_run(golden, converted_runs):
  with pytest.raises(convert.ConvertError, match="already holds a run"):
    convert.convert(FIXTURE / "model_best.pt", converted_runs["pickle"], eids=golden[2])


def test_sessions_given_in_the_users_order_are_paired_with_stitchers_by_neuron_count(golden, tmp_path, capsys):
  """The checkpoint's stitcher order is N = 37, 52; the user lists the 52-neuron session first."""
  from ibl_jax.data import synthetic
  state_dict, _, (eid37, eid52) = golden
  brain = synthetic.make_brain(0)
  dirs = {}
  for eid, n in ((eid52, 52), (eid37, 37)):  # the user's order
    session = synthetic.simulate_session(brain, eid=eid, n_neurons=n, regions=["VISa", "CA1"], n_trials=10, seed=n)
    dirs[eid] = tmp_path / eid
    synthetic.to_dataset_dict(session).save_to_disk(str(dirs[eid]))
  out = tmp_path / "run"
  assert convert.main(["--from-torch", str(FIXTURE / "model_best.pt"), "--out", str(out),
                       "--sessions", f"{dirs[eid52]},{dirs[eid37]}"]) == 0
  run = runs.open_run(out)
  assert run.eids == [eid52, eid37] and run.num_neurons == [52, 37]
  _, params, _ = runs.load_params(run)
  kernel = np.asarray(params["stitch_in"]["kernel"])  # [S, n_max, C]: row s is session s's stitcher
  np.testing.assert_array_equal(kernel[0, :52], state_dict["encoder.stitcher.stitcher_dict.52.weight"].T)
  np.testing.assert_array_equal(kernel[1, :37], state_dict["encoder.stitcher.stitcher_dict.37.weight"].T)
  # Paired by order (no neuron counts), the table is printed as a warning that says how to check it.
  convert.convert(FIXTURE / "model_best.pt", tmp_path / "by_order", eids=[eid37, eid52])
  out_text = capsys.readouterr().out
  assert f"{eid37}  ->  stitcher with N = 37" in out_text and "--num-neurons" in out_text


def test_equal_neuron_counts_in_two_stitchers_are_ambiguous():
  with pytest.raises(convert.ConvertError, match="ambiguous: stitchers a, b all have N = 40"):
    convert.resolve_sessions({"a": 40, "b": 40}, None, ["x", "y"], [40, 40], log=lambda _: None)
