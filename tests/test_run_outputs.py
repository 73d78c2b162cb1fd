"""What a run does with an earlier run's results, and what it tells its user.

All in-process and without training: the workdir check runs before the data
is loaded, and the rest are pure functions of a summary, a description or a
round's metrics.
"""
import contextlib
import logging
import pathlib
import sys

from absl import logging as absl_logging
import pytest
import tqdm

from mocosfl_jax import checkpoint
from mocosfl_jax import config as config_lib
from mocosfl_jax import metrics
from mocosfl_jax import train
from mocosfl_jax.sfl import moco


def _config():
  config = config_lib.default_config()
  config.update_from_flattened_dict({
      'num_clients': 10, 'batch_size': 2, 'num_rounds': 4, 'steps_per_round': 2,
      'sync_every': 2, 'data.source': 'digits', 'data.name': 'digits',
      'model.width': 0.0625, 'moco.queue_size': 64, 'eval.final_probes': False})
  return config


def _earlier_run(workdir: pathlib.Path) -> list[pathlib.Path]:
  """A workdir as a run from round 0 left it, killed before its first checkpoint."""
  with metrics.MetricsWriter(workdir) as writer:
    writer.write({'round': 0, 'step': 0, 'knn_accuracy': 20.0})
  (workdir / 'summary.json').write_text('{}')
  (workdir / 'best_knn' / '1').mkdir(parents=True)
  (workdir / checkpoint.CHECKPOINT_DIR).mkdir()
  (workdir / 'partition.json').write_text('{}')
  return sorted(workdir.iterdir())


@pytest.fixture
def no_training(monkeypatch):
  """train.run up to the point where the data would be loaded."""
  calls = []
  monkeypatch.setattr(train, '_run', lambda *args: calls.append(args) or {})
  return calls


def test_results_without_a_checkpoint_are_refused_with_one_line_naming_fresh(
    tmp_path, no_training):
  before = _earlier_run(tmp_path)
  with pytest.raises(checkpoint.CheckpointError) as error:
    train.run(_config(), tmp_path)
  message = str(error.value)
  assert '\n' not in message and '--fresh' in message
  for name in ('metrics.jsonl', 'summary.json', 'best_knn/', '1 TensorBoard event file'):
    assert name in message
  assert not no_training
  assert sorted(tmp_path.iterdir()) == before


def test_fresh_deletes_the_earlier_results_and_keeps_the_rest(tmp_path, no_training, caplog):
  _earlier_run(tmp_path)
  (tmp_path / checkpoint.CORRUPT_DIR).mkdir()
  with caplog.at_level(logging.WARNING, logger='mocosfl_jax'):
    train.run(_config(), tmp_path, fresh=True)
  assert len(no_training) == 1
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      checkpoint.CHECKPOINT_DIR, checkpoint.CORRUPT_DIR, 'partition.json']
  assert '--fresh: deleting metrics.jsonl, summary.json, best_knn/' in caplog.text


def test_a_run_stopped_before_its_first_record_leaves_nothing_to_refuse(tmp_path, no_training):
  metrics.MetricsWriter(tmp_path).close()
  (tmp_path / checkpoint.CHECKPOINT_DIR).mkdir()
  (tmp_path / 'partition.json').write_text('{}')
  assert train.earlier_results(tmp_path) == []
  train.run(_config(), tmp_path)
  assert len(no_training) == 1


def test_event_files_hold_a_record_or_a_purge(tmp_path):
  metrics.MetricsWriter(tmp_path).close()
  assert not list(tmp_path.glob('events.out.tfevents.*'))
  with metrics.MetricsWriter(tmp_path) as writer:
    writer.write({'round': 1, 'step': 10, 'loss': 1.0})
  # A resumed run stopped before its first record still hides what follows
  # its checkpoint.
  metrics.MetricsWriter(tmp_path, resume_from_round=0).close()
  assert len(list(tmp_path.glob('events.out.tfevents.*'))) == 2


def test_closing_block_says_what_the_run_gave_and_where_its_summary_is():
  summary = {'initial_knn_accuracy': 15.12, 'final_knn_accuracy': 30.5,
             'best_knn_accuracy': 33.91, 'rounds': 20, 'steps': 2000, 'wall_seconds': 1083.4,
             'steps_per_second': 2.91, 'images_per_second': 581.7}
  block = train.closing_block(summary, '/runs/cpu/summary.json')
  for part in ('15.12%', '30.50%', 'best 33.91%', '20 (2,000 steps)', '18 min 03 s',
               '581.7 images/s', '/runs/cpu/summary.json'):
    assert part in block
  assert 'probe' not in block
  entry = {'last_epoch': 35.6, 'best_epoch': 38.2, 'best_epoch_index': 80}
  model = {'description': 'final model', 'round': 20, 'knn_accuracy': 30.5,
           'linear': entry, 'mlp_10pct': entry, 'mlp_1pct': None}
  headline = {'model': 'final', 'linear': 38.2, 'mlp_10pct': 38.2, 'mlp_1pct': None}
  summary['probes'] = {'probe_epochs': 100, 'models': {'final': model},
                       'reference_numbers': headline, 'honest_numbers': None}
  block = train.closing_block(summary, '/runs/cpu/summary.json')
  assert 'probes (100 epochs' in block and '35.60 / 38.20' in block
  assert 'attack' not in block
  summary['attack'] = {'metrics': {'mse': 0.0412, 'ssim': 0.512, 'ssim_valid': 0.3,
                                   'psnr': 13.85}}
  block = train.closing_block(summary, '/runs/cpu/summary.json')
  assert 'MSE 0.0412, SSIM 0.512, PSNR 13.85 dB' in block
  assert block.splitlines()[-1].endswith('/runs/cpu/summary.json')


def test_describe_table_is_short_lines_not_json():
  info = {'devices': ['TFRT_CPU_0'], 'client_impl': 'matmul', 'num_clients': 100,
          'pool_size': 100, 'batch_size': 1, 'steps_per_round': 14, 'rounds': 25,
          'total_steps': 350, 'cut_layer': 1, 'paper_name': 'MocoSFL-1', 'client_params': 232,
          'server_params': 174834, 'smashed_shape': [32, 32, 8],
          'communication_per_client_mb': {'upload_mb': 21.9, 'download_mb': 11.0,
                                          'total_mb': 32.9, 'rounds_in_pool': 25.0},
          'train_samples': 1437, 'test_samples': 360}
  table = train.describe_table(info)
  assert '{' not in table and '"' not in table
  assert all(len(line) <= 80 for line in table.splitlines())
  for part in ('100, 100 a round, batch 1', '25 rounds x 14 steps = 350 steps', 'MocoSFL-1',
               '32x32x8', 'client 232, server 174,834', '32.9 MB', '1,437 training, 360 test'):
    assert part in table


def test_time_left_counts_only_rounds_after_the_first():
  assert train.time_left(24, 0, 0.0) == '?'
  # Round 1 compiled for 60 s, rounds 2 and 3 took 5 s each: 22 rounds left.
  assert train.time_left(22, 2, 10.0) == '01:50'


def test_progress_bar_shows_no_estimate_of_its_own(capsys):
  bar = train.progress_bar(0, 25)
  bar.update(1)
  bar.set_postfix({'loss': '10.2', 'left': '?'})
  line = str(bar)
  bar.close()
  capsys.readouterr()
  assert line.endswith(', loss=10.2, left=?]') and '<' not in line


def _stream_handler():
  return logging.StreamHandler(sys.stderr)


def _absl_handler():
  """absl's, as main installs it: not a StreamHandler, so tqdm's redirect misses it."""
  handler = absl_logging.ABSLHandler(absl_logging.PythonFormatter())
  handler.python_handler.stream = sys.stderr
  return handler


@contextlib.contextmanager
def _console(handler):
  root = logging.getLogger()
  root.addHandler(handler)
  try:
    yield
  finally:
    root.removeHandler(handler)


@pytest.mark.parametrize('make_handler', [_stream_handler, _absl_handler])
def test_a_warning_during_the_bar_gets_a_line_of_its_own_once(capsys, make_handler):
  with _console(make_handler()), train.logs_above_the_bar():
    for _ in tqdm.tqdm(range(3), desc='rounds', file=sys.stderr, mininterval=0):
      logging.getLogger('mocosfl_jax').warning('SIGTERM received')
  err = capsys.readouterr().err
  lines = [line.split('\r')[-1] for line in err.split('\n')]
  assert err.count('SIGTERM received') == 3
  assert len([line for line in lines if line.endswith('SIGTERM received')]) == 3
  assert not [line for line in lines if 'SIGTERM' in line and 'rounds' in line]


K = 256  # configs/quickstart.py
VALUE = moco.collapse_value(K, symmetric=True)


@pytest.mark.parametrize('loss, accuracy', [
    (10.65, 0.046),               # quickstart, round 2: an early model
    (VALUE * 0.995, 0.05),        # near the value, but the positive is found 13x chance
    (VALUE * 0.97, 1 / (K + 1)),  # chance accuracy, loss 3% off: not all scores alike
])
def test_an_early_loss_near_the_collapse_value_is_not_collapse(loss, accuracy):
  assert not train.collapsed(loss, accuracy, K, symmetric=True)


@pytest.mark.parametrize('loss, accuracy', [
    (VALUE * 0.998, 1 / (K + 1)),  # at the value, accuracy at chance
    (VALUE, 1.0),                  # every logit equal: ties broken towards the positive
])
def test_collapse_is_the_value_with_chance_accuracy_or_the_exact_value(loss, accuracy):
  assert train.collapsed(loss, accuracy, K, symmetric=True)


def test_collapse_is_said_once_in_plain_words():
  watch = train.CollapseWatch(K, symmetric=True)
  rounds = [(10.2, 0.078), (VALUE * 0.995, 0.046), (VALUE * 0.999, 0.04), (9.0, 0.2),
            (VALUE, 0.002), (VALUE, 0.003), (VALUE, 0.001)]
  said = {r: watch.check(r, loss, accuracy) for r, (loss, accuracy) in enumerate(rounds, 1)}
  assert [r for r, warning in said.items() if warning] == [5]
  assert said[5].startswith('round 5: training has collapsed')
  assert "other view from the 256 keys in the queue" in said[5]
  assert 'ln(' not in said[5]


def test_per_client_queues_collapse_at_their_own_size():
  config = _config()
  assert train.negatives_per_row(config) == 64
  config.moco.feature_sharing = False
  assert train.negatives_per_row(config) == 64 // 10
