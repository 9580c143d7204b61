"""The PyTorch NDT2 of the benchmark computes what ours computes, from the weights our export writes."""

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="the PyTorch NDT2 needs torch: pip install -r requirements-convert.txt")

from ibl_jax import convert, models, steps as steps_lib  # pylint: disable=wrong-import-position
from ibl_jax import torch_ndt2  # pylint: disable=wrong-import-position
from ibl_jax.errors import UserError  # pylint: disable=wrong-import-position

NUM_NEURONS, N_MAX = [150, 70, 100], 150  # small config: F = 64 -> 3 space patches; session 1 fills 2, 2 fills 2


def _models(cfg, session_regions=None, seed=3):
  """Ours (jitted: `prompt_idx` and `causal` are traced, one compile) with random params, biases and norms too,
  and the PyTorch one built from their export."""
  # The structure only (every value is drawn below): an eager init would cost seconds of op compiles.
  model = nnx.eval_shape(lambda: steps_lib.build_model(
      cfg, num_sessions=len(NUM_NEURONS), n_max=N_MAX, session_neurons=NUM_NEURONS, session_regions=session_regions,
      seed=seed))
  graphdef, params = steps_lib.split_params(model)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32) * 0.3, params)
  sd = convert.params_to_torch_state_dict(params, cfg, NUM_NEURONS)
  theirs = torch_ndt2.from_state_dict(sd, cfg, NUM_NEURONS, N_MAX, session_regions=session_regions, params=params)
  forward = jax.jit(lambda p, *inputs: nnx.merge(graphdef, p)(*inputs))
  return lambda *inputs: forward(params, *inputs), theirs


def _batch(T, seed=0):
  rng = np.random.default_rng(seed)
  session_B = np.array([0, 1, 2, 1, 0, 2], np.int32)  # mixed sessions
  spikes_BxTxN = rng.integers(0, 4, (len(session_B), T, N_MAX)).astype(np.float32)  # padded entries nonzero too
  time_mask_BxT = np.ones((len(session_B), T), bool)
  time_mask_BxT[2, T - 7:] = False  # trials with padded bins
  time_mask_BxT[3, T - 1:] = False
  return spikes_BxTxN, time_mask_BxT, session_B


def _torch_forward(theirs, spikes_BxTxN, time_mask_BxT, session_B, prompt, causal):
  with torch.no_grad():
    return theirs(torch.from_numpy(spikes_BxTxN), torch.from_numpy(time_mask_BxT), torch.from_numpy(session_B).long(),
                  prompt, causal).numpy()


def _assert_equal(got, expected, time_mask_BxT, session_B, what):
  """Real neurons and real bins within 1e-5 (relative to the log-rates' scale); every entry close too."""
  assert got.shape == expected.shape and got.dtype == np.float32
  for b, s in enumerate(session_B):
    real_T = time_mask_BxT[b]
    np.testing.assert_allclose(got[b, real_T, :NUM_NEURONS[s]], expected[b, real_T, :NUM_NEURONS[s]],
                               rtol=1e-5, atol=1e-5, err_msg=f"trial {b}, {what}")
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=what)  # padding: defined, and equal


@pytest.mark.parametrize("variant", ["default", "variants"])
def test_torch_ndt2_matches_ours_on_mixed_sessions_with_padding(variant):
  cfg = models.family("ndt2").default_config("small")
  cfg.embed_dropout, cfg.dropout, cfg.attention_dropout = 0.2, 0.4, 0.4  # the paper's: off in eval() mode
  regions, T = None, 24
  if variant == "variants":  # several bins per patch (a partial last time patch), regions, ScaleNorm, tanh GELU
    cfg.patch_bins, cfg.norm, cfg.gelu_approximate, cfg.embed_region = 5, "scalenorm", True, True
    cfg.embed_act, cfg.embed_scale = "identity", 0.7
    rng = np.random.default_rng(1)
    regions = [rng.integers(0, 5, n).tolist() for n in NUM_NEURONS]
  ours, theirs = _models(cfg, regions)
  spikes_BxTxN, time_mask_BxT, session_B = _batch(T)
  for prompt, causal in ((0, False), (1, True), (3, False), (2, True)):
    expected = np.asarray(ours(spikes_BxTxN, time_mask_BxT, session_B, prompt, causal))
    got = _torch_forward(theirs, spikes_BxTxN, time_mask_BxT, session_B, prompt, causal)
    _assert_equal(got, expected, time_mask_BxT, session_B, f"prompt {prompt}, causal {causal}")


def test_torch_ndt2_train_mode_drops_and_eval_mode_matches():
  cfg = models.family("ndt2").default_config("small")
  cfg.embed_dropout, cfg.dropout, cfg.attention_dropout = 0.2, 0.4, 0.4
  ours, theirs = _models(cfg)
  spikes_BxTxN, time_mask_BxT, session_B = _batch(16)
  inputs = (spikes_BxTxN, time_mask_BxT, session_B, 0, True)
  expected = np.asarray(ours(*inputs))
  theirs.train()
  torch.manual_seed(0)
  first, second = _torch_forward(theirs, *inputs), _torch_forward(theirs, *inputs)
  theirs.eval()
  got = _torch_forward(theirs, *inputs)
  assert np.abs(first - expected).max() > 1e-2 and np.abs(first - second).max() > 1e-2
  _assert_equal(got, expected, time_mask_BxT, session_B, "eval() after train()")
  # Each dropout alone drops something (its place is reached in train() mode).
  for rates in ((0.2, 0.0, 0.0), (0.0, 0.4, 0.0), (0.0, 0.0, 0.4)):
    cfg.embed_dropout, cfg.dropout, cfg.attention_dropout = rates
    _, one = _models(cfg)
    deterministic = _torch_forward(one, *inputs)
    one.train()
    assert np.abs(_torch_forward(one, *inputs) - deterministic).max() > 1e-3, rates


def test_torch_ndt2_rejects_what_it_does_not_cover():
  cfg = models.family("ndt2").default_config("small")
  cfg.compat = "original"
  with pytest.raises(UserError, match="compat"):
    torch_ndt2.TorchNDT2(cfg, num_sessions=1, n_max=N_MAX)
  cfg = models.family("ndt2").default_config("small")
  cfg.embed_region = True
  with pytest.raises(UserError, match="session_regions"):
    torch_ndt2.TorchNDT2(cfg, num_sessions=1, n_max=N_MAX)
