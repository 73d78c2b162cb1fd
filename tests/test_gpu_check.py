"""experiments/gpu_check.py end to end at toy sizes on the CPU, so the kit runs on a first GPU."""
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'experiments'))

import gpu_check  # noqa: E402



@pytest.fixture(scope='module')
def tiny_check(tmp_path_factory):
  """The JSON and out dir of one tiny check: one setting and formulation, both round
  formulations, and a one-round accuracy run with its kNN curve."""
  out = tmp_path_factory.mktemp('gpu_check')
  done = subprocess.run([sys.executable, str(ROOT / 'experiments' / 'gpu_check.py'), '--tiny',
                         '--out-dir', str(out), '--settings', 'a', '--bf16-settings', '',
                         '--impls', 'matmul', '--accuracy-steps', '2', '--knn-every', '1'],
                        cwd=ROOT, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads((out / 'gpu_check.json').read_text()), out


def test_benchmark_record_has_times_flops_and_memory(tiny_check):
  results, _ = tiny_check
  assert results['mode'] == 'tiny' and results['backend'] == 'cpu'
  [run] = [r for r in results['runs'] if r['section'] == 'benchmark']
  assert (run['setting'], run['impl'], run['dtype']) == ('a', 'matmul', 'float32')
  assert 0 < run['step_seconds_median'] < run['compile_seconds'] + 60
  assert run['program_flops'] > 1e6 and run['program_memory_bytes'] > 0
  # The CPU keeps no device statistics and has no peak in the table.
  assert run['device_peak_bytes'] is None and run['mfu'] is None


def test_round_as_one_program_and_stepwise_give_the_same_loss(tiny_check):
  results, _ = tiny_check
  runs = {r['round_impl']: r for r in results['runs'] if r['section'] == 'rounds'}
  assert set(runs) == {'scan', 'loop'}
  for run in runs.values():
    assert run['first_round_seconds'] > 0 and run['step_seconds'] > 0
  assert runs['scan']['loss'] == pytest.approx(runs['loop']['loss'], rel=1e-4)


def test_accuracy_run_writes_its_knn_curve_under_the_out_dir(tiny_check):
  results, out = tiny_check
  [run] = [r for r in results['runs'] if r['section'] == 'accuracy']
  assert 'error' not in run, run.get('error')
  assert [step for step, _ in run['knn_curve']] == [0, 2]
  assert all(0 <= accuracy <= 100 for _, accuracy in run['knn_curve'])
  assert (out / 'accuracy' / 'metrics.jsonl').is_file()


@pytest.mark.parametrize('kind,dtype,peak', [
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989e12), ('NVIDIA H100 PCIe', 'float32', 378e12),
    ('NVIDIA H200', 'bfloat16', 989e12), ('NVIDIA A100-SXM4-80GB', 'float32', 156e12),
    ('cpu', 'float32', None)])
def test_peak_flops_by_device_kind(kind, dtype, peak):
  assert gpu_check.peak_flops(kind, dtype) == peak


def test_accuracy_run_without_tfds_says_what_to_pass(monkeypatch, tmp_path):
  real = gpu_check.importlib.util.find_spec
  monkeypatch.setattr(gpu_check.importlib.util, 'find_spec',
                      lambda name: None if name == 'tensorflow_datasets' else real(name))
  args = gpu_check.parse_args(['--out-dir', str(tmp_path)])
  record = gpu_check.accuracy_run(args, str(tmp_path))
  assert record['data_source'] == 'tfds' and '--data-source=cifar_python' in record['error']
