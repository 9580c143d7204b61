"""The PyTorch NDT1 of the benchmark computes what ours computes, from the weights our export writes."""

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="the PyTorch NDT1 needs torch: pip install -r requirements-convert.txt")

from ibl_jax import convert, steps as steps_lib  # pylint: disable=wrong-import-position
from ibl_jax import torch_ndt1  # pylint: disable=wrong-import-position

from conftest import load_config_module  # pylint: disable=wrong-import-position


@pytest.mark.parametrize("causal_prefix", ["strict", "original"])
def test_torch_ndt1_matches_ours_on_mixed_sessions_with_padding(causal_prefix):
  cfg = load_config_module("ndt1").model_config("small")
  cfg.causal_prefix = causal_prefix
  cfg.embed_dropout, cfg.dropout, cfg.attention_dropout = 0.2, 0.4, 0.4  # the paper's: off in eval() mode
  num_neurons, n_max, B, T = [20, 33, 27], 33, 6, 40
  model = steps_lib.build_model(cfg, num_sessions=3, n_max=n_max, seed=3)
  graphdef, params = steps_lib.split_params(model)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32) * 0.3, params)  # biases too
  for i, n in enumerate(num_neurons):  # padded neurons carry nothing (the export drops them)
    params["stitch_in"]["kernel"][i, n:] = 0
  sd = convert.params_to_torch_state_dict(params, cfg, num_neurons)
  theirs = torch_ndt1.from_state_dict(sd, cfg, num_neurons, n_max).eval()

  session_B = np.array([0, 1, 2, 1, 0, 2], np.int32)
  spikes_BxTxN = rng.poisson(1.0, (B, T, n_max)).astype(np.float32)
  for b, s in enumerate(session_B):
    spikes_BxTxN[b, :, num_neurons[s]:] = 0
  time_mask_BxT = np.ones((B, T), bool)
  time_mask_BxT[2, 30:] = False  # a trial with padded bins
  ours = nnx.merge(graphdef, params)
  for prompt, causal in ((0, False), (1, True), (3, False)):
    expected = np.asarray(ours(spikes_BxTxN, time_mask_BxT, session_B, prompt, causal))
    with torch.no_grad():
      got = theirs(torch.from_numpy(spikes_BxTxN), torch.from_numpy(time_mask_BxT),
                   torch.from_numpy(session_B).long(), prompt, causal).numpy()
    for b, s in enumerate(session_B):  # real neurons and real bins
      real_T = time_mask_BxT[b]
      np.testing.assert_allclose(got[b, real_T, :num_neurons[s]], expected[b, real_T, :num_neurons[s]],
                                 rtol=1e-4, atol=1e-4, err_msg=f"trial {b}, prompt {prompt}, causal {causal}")
    if prompt == 0:  # train() mode drops: a forward differs from the deterministic one, and from the next
      theirs.train()
      with torch.no_grad():
        inputs = (torch.from_numpy(spikes_BxTxN), torch.from_numpy(time_mask_BxT), torch.from_numpy(session_B).long(),
                  prompt, causal)
        first, second = theirs(*inputs).numpy(), theirs(*inputs).numpy()
      theirs.eval()
      assert np.abs(first - got).max() > 1e-2 and np.abs(first - second).max() > 1e-2


def test_mask_neurons_as_the_original_masker():
  torch.manual_seed(0)
  spikes = torch.randint(0, 5, (3, 7, 40)).float()
  inputs, mask = torch_ndt1.mask_neurons(spikes, 1.0, 1.0, 1.0)  # every neuron masked, every entry zeroed
  assert bool(mask.all()) and not bool(inputs.any())
  inputs, mask = torch_ndt1.mask_neurons(spikes, 0.0, 1.0, 1.0)
  assert not bool(mask.any()) and torch.equal(inputs, spikes)
  inputs, mask = torch_ndt1.mask_neurons(spikes, 0.5, 0.0, 1.0)  # masked entries all replaced by random counts
  masked_N = mask[0, 0]
  assert 0 < int(masked_N.sum()) < 40 and torch.equal(mask, masked_N.expand_as(mask))  # whole neurons, batch-wide
  assert torch.equal(inputs[:, :, ~masked_N], spikes[:, :, ~masked_N])
  replaced = inputs[:, :, masked_N]
  assert float(replaced.min()) >= 0 and float(replaced.max()) < float(spikes.max())
  assert not torch.equal(replaced, spikes[:, :, masked_N])
