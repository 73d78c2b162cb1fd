"""Final evaluations: the probes in summary.json and the evaluate command."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from mocosfl_jax import checkpoint
from mocosfl_jax import cli
from mocosfl_jax import config as config_lib
from mocosfl_jax import evaluate
from mocosfl_jax import metrics as metrics_lib
from mocosfl_jax import train
from mocosfl_jax.evaluation import final

import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(config_lib.__file__)))
NUM_ROUNDS, PROBE_EPOCHS = tiny.NUM_ROUNDS, tiny.PROBE_EPOCHS
PROBES = ('linear', 'mlp_10pct', 'mlp_1pct')


@pytest.fixture
def finished_run(tiny_run, tmp_path):
  """A copy of the session's finished tiny run with its probes: (workdir, summary)."""
  workdir, summary = tiny_run
  copy = tmp_path / 'tiny_run'
  shutil.copytree(workdir, copy)
  return copy, summary


def test_summary_reports_the_probes_of_the_final_and_best_knn_models(finished_run):
  workdir, summary = finished_run
  assert json.loads((workdir / 'summary.json').read_text()) == summary
  probes = summary['probes']
  assert probes['probe_epochs'] == PROBE_EPOCHS
  models = probes['models']
  assert set(models) == {'final', 'best_knn'}

  with open(workdir / metrics_lib.METRICS_FILENAME) as f:
    evaluated = [(r['round'], r['knn_accuracy']) for r in map(json.loads, f)
                 if 'knn_accuracy' in r and r['round'] > 0]
  best_round, best_knn = max(evaluated, key=lambda entry: entry[1])
  # The kNN accuracies are measured again on the probed models: they are the
  # models of those rounds.
  assert models['final']['round'] == NUM_ROUNDS
  assert models['final']['knn_accuracy'] == summary['final_knn_accuracy']
  assert models['best_knn']['round'] == best_round
  assert models['best_knn']['knn_accuracy'] == best_knn
  assert summary['best_knn_accuracy'] == best_knn

  num_train = summary['run']['train_samples']
  labelled = {'linear': num_train, 'mlp_10pct': int(0.1 * num_train),
              'mlp_1pct': int(0.01 * num_train)}
  for entry in models.values():
    for probe in PROBES:
      result = entry[probe]
      assert 0 <= result['last_epoch'] <= result['best_epoch'] <= 100
      assert 0 <= result['best_epoch_index'] < PROBE_EPOCHS
      assert result['labelled_examples'] == labelled[probe]

  reference, honest = probes['reference_numbers'], probes['honest_numbers']
  assert reference['model'] == 'best_knn'
  assert honest['model'] == 'final'
  for probe in PROBES:
    assert reference[probe] == models['best_knn'][probe]['best_epoch']
    assert honest[probe] == models['final'][probe]['last_epoch']


def test_best_knn_counts_trained_models_only():
  history = [(0, 90.0), (1, 50.0), (2, 60.0), (3, 55.0)]
  assert train.best_trained_knn(history) == 60.0
  assert train.best_trained_knn(history[:1], default=90.0) == 90.0
  assert train.best_trained_knn(history[:1]) == float('-inf')


def test_evaluate_reproduces_the_summary_probes(finished_run):
  workdir, summary = finished_run
  evaluation = evaluate.run(workdir)
  assert evaluation['models'] == summary['probes']['models']
  assert evaluation['reference_numbers'] == summary['probes']['reference_numbers']
  assert evaluation['honest_numbers'] == summary['probes']['honest_numbers']
  assert json.loads((workdir / evaluate.EVALUATION_FILENAME).read_text()) == evaluation


def test_evaluate_rejects_missing_and_unreadable_checkpoints(finished_run, tmp_path):
  workdir, _ = finished_run
  with pytest.raises(evaluate.EvaluationError, match='no directory'):
    evaluate.run(tmp_path / 'absent')
  kept = list(range(NUM_ROUNDS - 2, NUM_ROUNDS + 1))   # checkpoint.keep = 3
  with pytest.raises(evaluate.EvaluationError, match=re.escape(f'saved rounds {kept}')):
    evaluate.run(workdir, '1')
  with pytest.raises(evaluate.EvaluationError, match='no best-kNN model'):
    evaluate.run(tmp_path, 'best')

  broken = tmp_path / 'broken'
  shutil.copytree(workdir / checkpoint.CHECKPOINT_DIR, broken / checkpoint.CHECKPOINT_DIR)
  shutil.rmtree(broken / checkpoint.CHECKPOINT_DIR / str(NUM_ROUNDS) / 'meta')
  with pytest.raises(evaluate.EvaluationError, match=f'{NUM_ROUNDS} is unreadable'):
    evaluate.run(broken)
  assert not (broken / evaluate.EVALUATION_FILENAME).exists()
  # Read-only: the broken checkpoint is neither moved nor repaired.
  assert (broken / checkpoint.CHECKPOINT_DIR / str(NUM_ROUNDS) / 'state').is_dir()


def test_command_line_prints_one_error_line_for_an_empty_workdir(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  result = subprocess.run(
      [sys.executable, '-m', 'mocosfl_jax.evaluate', f'--workdir={tmp_path}'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert lines[-1] == f'error: {tmp_path} holds no checkpoint (none in {tmp_path}/checkpoints)'
  assert not (tmp_path / evaluate.EVALUATION_FILENAME).exists()


def test_evaluate_fails_before_any_work_when_it_cannot_write_its_file(tmp_path, monkeypatch):
  monkeypatch.setattr(train, 'build', lambda config: pytest.fail('built the experiment'))
  (tmp_path / evaluate.EVALUATION_FILENAME).mkdir()
  with pytest.raises(cli.OutputPathError, match='evaluation.json is a directory'):
    evaluate.run(tmp_path)


def test_evaluate_shows_the_results_before_writing_them(finished_run, tmp_path, monkeypatch):
  workdir, _ = finished_run
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  # The probes are tested above; here only what happens to their results.
  monkeypatch.setattr(final, 'final_evaluation',
                      lambda *args, **kwargs: {'probes': 'results'})

  def disk_full(path, obj):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(metrics_lib, 'write_json', disk_full)
  shown = []
  with pytest.raises(cli.OutputPathError, match='cannot write .*No space left on device'):
    evaluate.run(copy, show=shown.append)
  assert shown == [{'selection': 'all', 'probes': 'results'}]
