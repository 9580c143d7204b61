"""The benchmark runs end to end on a tiny model and reports sane, complete numbers (no timing assertions)."""

import importlib.util
import json
import math
import platform
import subprocess
import sys

import pytest

from ibl_jax import bench, op_profile
from ibl_jax.models import ndt1

from conftest import tiny_config

TRAIN_KEYS = ("batch", "compile_s", "step_ms_p10", "step_ms_median", "step_ms_p90", "trials_per_s", "tokens_per_s",
              "flops_per_step", "flops_per_s", "peak_memory_bytes", "loop_trials_per_s")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("bench")
  config = tiny_config(tmp, tmp)
  what = bench.WHATS if importlib.util.find_spec("torch") else tuple(w for w in bench.WHATS if w != "torch")
  return config, bench.run(config, what=what, sizes=(4,), steps=2, sessions=2, neurons=12, eval_trials=3,
                           eval_chunk=8, eval_max_chunks=2)


def _positive_finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_json_has_every_key_and_sane_values(results):
  _, r = results
  json.dumps(r)  # JSON-able as written by --out
  for key in ("trials_per_s", "step_ms_median", "compile_s", "flops_per_step"):
    assert _positive_finite(r[key]), key
  assert [t["batch"] for t in r["train"]] == [4]
  for t in r["train"]:
    for key in TRAIN_KEYS:
      assert _positive_finite(t[key]), (key, t[key])
    assert t["step_ms_p10"] <= t["step_ms_median"] <= t["step_ms_p90"]
    assert t["compilations"] == 1, "the timed steps must not recompile the train step"
    assert t["mfu"] is None or 0 < t["mfu"] < 1
    assert t["cudnn_attention_calls"] == 0  # a CPU has no cuDNN
  for key in ("forwards_per_s", "heldout_neurons_per_s", "session_s", "first_chunk_s"):
    assert _positive_finite(r["eval"][key]), key
  assert r["eval"]["neurons"] == 12 and r["eval"]["trials"] == 3
  assert _positive_finite(r["data"]["trials_per_s"])
  assert _positive_finite(r["reference"]["trials_per_s"])
  assert _positive_finite(r["reference"]["batched_over_reference"])
  assert r["reference"]["compilations"] == 1


def test_cudnn_attention_calls_counts_the_fused_kernels_of_a_gpu_step():
  # Lines as XLA:GPU prints a step with cuDNN's fused attention forward and backward (targets from
  # jax._src.cudnn.fused_attention_stablehlo), and a cuBLAS GEMM that must not count.
  hlo = "\n".join([
      '%fmha = (bf16[8,102,8,64]{3,2,1,0}, u8[0]{0}) custom-call(%q, %k, %v, %bias), '
      'custom_call_target="__cudnn$fmhaScaleBiasSoftmax", backend_config={...}',
      '%fmha.bwd = (bf16[8,102,8,64]{3,2,1,0}, u8[0]{0}) custom-call(%q, %k, %v, %bias, %o, %do), '
      'custom_call_target="__cudnn$fmhaScaleBiasSoftmaxBackward"',
      '%gemm = (bf16[816,512]{1,0}, s8[0]{0}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul"'])
  assert bench.cudnn_attention_calls(hlo) == 2
  assert bench.cudnn_attention_calls(hlo.replace("__cudnn$fmha", "__cublas$gemm")) == 0


def test_flops_are_three_forwards_per_trial(results):
  config, r = results
  per_trial = ndt1.flops_per_trial(config.model, r["corpus"]["T"], r["corpus"]["n_max"])
  assert r["flops_per_trial"] == per_trial
  for t in r["train"]:
    assert t["flops_per_step"] == 3 * t["batch"] * per_trial
    assert t["flops_per_s"] == pytest.approx(t["flops_per_step"] / (t["step_ms_median"] / 1e3))


def test_report_is_a_table(results):
  text = bench.format_report(results[1])
  for word in ("train", "trials/s", "eval", "data", "reference"):
    assert word in text
  cpu = results[1]["device"]["host_cpu"]
  assert f"host {cpu['model'] or 'CPU'}" in text.splitlines()[0]


def test_host_cpu_names_the_instruction_sets_that_decide_cpu_figures():
  intel = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"
           "flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16 amx_bf16 amx_tile\n\n"
           "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx2 avx512f\n")
  assert bench.host_cpu(intel) == {"model": "Intel(R) Xeon(R) Processor",
                                   "isa": ["AMX", "AVX512-BF16", "AVX-512", "AVX2"]}
  zen3 = "model name\t: AMD EPYC 7763 64-Core Processor\nflags\t\t: fpu sse2 avx avx2 fma\n"
  assert bench.host_cpu(zen3) == {"model": "AMD EPYC 7763 64-Core Processor", "isa": ["AVX2"]}
  arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes\n"
  assert bench.host_cpu(arm) == {"model": "", "isa": ["NEON"]}


def test_peak_flops_by_chip_and_dtype():
  assert bench.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16")[0] == 989e12
  assert bench.peak_flops("NVIDIA H100 80GB HBM3", "float32")[0] == 495e12  # TF32 under default precision
  assert bench.peak_flops("NVIDIA H100 PCIe", "bfloat16")[0] == 756e12
  assert bench.peak_flops("NVIDIA H200", "bfloat16")[0] == 989e12
  assert bench.peak_flops("NVIDIA A100-SXM4-80GB", "bfloat16")[0] == 312e12
  assert bench.peak_flops("cpu", "float32") == (None, "")


def test_unknown_benchmark_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="unknown benchmark"):
    bench.run(tiny_config(tmp_path, tmp_path), what=("train", "speed"))


def test_cli_writes_json(tmp_path, subprocess_env):
  """Flags reach the run (data only: nothing to compile, so the test stays quick)."""
  out = tmp_path / "b.json"
  cmd = [sys.executable, "-m", "ibl_jax.bench", "--what=data", "--sizes=4,8", "--steps=2", "--sessions=2",
         "--neurons=12", "--config.model.num_layers=1", "--config.mesh.cpu_devices=2", "--dtype=bf16",
         "--config.mesh.reuse_freed_memory=true", f"--out={out}"]
  env = {k: v for k, v in subprocess_env.items()
         if k not in ("GLIBC_TUNABLES", "IBL_JAX_MALLOC_RESTARTED", "IBL_JAX_KEEP_FREED_MEMORY")}
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "trials/s" in proc.stdout
  r = json.loads(out.read_text())
  assert r["dtype"] == "bfloat16" and r["model"]["num_layers"] == 1 and r["device"]["count"] == 2
  assert r["data"]["batch"] == 4 and r["corpus"]["n_max"] == 12
  # `python -m ibl_jax.bench` restarted itself with malloc reusing freed memory (glibc Linux; hostmem.py)
  glibc_linux = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
  assert r["device"]["malloc_reuses_freed_memory"] == ("one_arena" if glibc_linux else None)  # "true": one_arena


def test_top_ops_sum_each_ops_time_a_step_and_name_their_source():
  events = [{"name": "fusion.3", "dur": 3000.0}, {"name": "fusion.3", "dur": 1000.0},  # 2 steps, 2 devices
            {"name": "dot.7", "dur": 6000.0}, {"name": "ThunkExecutor::Execute", "dur": 9e6},
            {"name": "$bench.py:215 train", "dur": 9e6}, {"name": "Wait: pending_threads=1/2", "dur": 9e6}]
  ops = op_profile.top_ops(events, steps=2)
  assert ops == [{"op": "dot.7", "ms_per_step": 3.0, "calls_per_step": 0.5},
                 {"op": "fusion.3", "ms_per_step": 2.0, "calls_per_step": 1.0}]
  hlo = ('  %fusion.3 = f32[8,64]{1,0} fusion(%p), kind=kLoop, metadata={op_name="jit(step)/jvp()/exp"}\n'
         '  ROOT %dot.7 = f32[8,8]{1,0} dot(%a, %b), lhs_contracting_dims={1}\n')
  described = op_profile.describe(ops, hlo)
  assert [(o["shape"], o["source"]) for o in described] == [("f32[8,8]{1,0}", ""),
                                                             ("f32[8,64]{1,0}", "jit(step)/jvp()/exp")]
  assert "jit(step)/jvp()/exp" in op_profile.format_top_ops(described)


def test_cli_profile_traces_the_train_steps_and_lists_their_ops(tmp_path, subprocess_env):
  out, trace_dir = tmp_path / "b.json", tmp_path / "trace"
  cmd = [sys.executable, "-m", "ibl_jax.bench", "--what=train", "--sizes=4", "--steps=1", "--sessions=2",
         "--neurons=12", "--config.model.num_layers=1", f"--profile={trace_dir}", f"--out={out}"]
  proc = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  ops = json.loads(out.read_text())["train"][0]["top_ops"]
  assert ops and all(o["ms_per_step"] > 0 for o in ops)
  assert any("train_step" in o["source"] for o in ops)  # compiled ops of the step, named by their source
  assert list(trace_dir.glob("**/*.trace.json.gz"))  # the trace stays for TensorBoard / Perfetto
  assert "top ops, batch 4" in proc.stdout


def test_torch_comparison_checks_equal_outputs_and_reports_ratios(results):
  _, r = results
  if "torch" not in r:
    pytest.skip("torch is not installed: pip install -r requirements-convert.txt")
  row = r["torch"]["sizes"]["4"]
  assert row["max_abs_diff"] < 1e-4  # the same model and weights in both frameworks
  for key in ("ours_train_trials_per_s", "torch_train_trials_per_s", "ours_eval_forwards_per_s",
              "torch_eval_forwards_per_s"):
    assert _positive_finite(row[key]), key
  assert row["train_ratio"] == pytest.approx(row["ours_train_trials_per_s"] / row["torch_train_trials_per_s"])
  assert row["rounds"] == 3  # bench.run's default
  for key in ("train_ratio_rounds", "eval_ratio_rounds"):
    assert len(row[key]) == 3 and all(_positive_finite(x) for x in row[key]), key
  spread = f"({min(row['train_ratio_rounds']):.2f}-{max(row['train_ratio_rounds']):.2f})"
  assert "ours vs PyTorch" in bench.format_report(r) and spread in bench.format_report(r)


def test_torch_comparison_of_ndt2_and_of_bf16(tmp_path):
  pytest.importorskip("torch", reason="pip install -r requirements-convert.txt")
  from test_ndt2 import tiny_config as tiny_ndt2_config  # pylint: disable=g-import-not-at-top
  ndt1_bf16 = tiny_config(tmp_path, tmp_path)
  ndt1_bf16.model.dtype = "bfloat16"
  for config, tolerance in ((tiny_ndt2_config(tmp_path, tmp_path), 1e-4), (ndt1_bf16, 0.1)):
    r = bench.run(config, what=("torch",), sizes=(4,), steps=1, sessions=2, neurons=12)
    row = r["torch"]["sizes"]["4"]
    assert r["torch"]["dtype"] == config.model.dtype and row["max_abs_diff"] < tolerance, row["max_abs_diff"]
    assert _positive_finite(row["train_ratio"]) and _positive_finite(row["eval_ratio"])
