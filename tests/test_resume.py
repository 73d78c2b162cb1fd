"""End-to-end tests of training operations on a tiny run.

Reproducibility, exact resume after SIGTERM and SIGKILL, a corrupt newest
checkpoint, --fresh, the command line's errors and a diverging run. Every
run is of the tiny config (tiny.py), whose programs the session's persistent
compilation cache (conftest.py) holds after the first, in this process and in
the command lines it starts.
"""
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import mocosfl_jax
from mocosfl_jax import checkpoint
from mocosfl_jax import metrics
from mocosfl_jax import train

import tiny

# A failed read must not spill its other arrays' errors (checkpoint.quiet_failed_reads).
pytestmark = pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')

NUM_ROUNDS = tiny.NUM_ROUNDS
CONFIG_FILE = f"""from mocosfl_jax import config


def get_config():
  c = config.default_config()
  c.update_from_flattened_dict({tiny.OVERRIDES!r})
  return c
"""
# How long a subprocess may take to reach the state a test waits for.
DEADLINE_S = 300


@pytest.fixture
def reference(tiny_run):
  """The workdir of an uninterrupted run (with probes, which change none of what is compared)."""
  return tiny_run[0]


def _records(workdir):
  """metrics.jsonl without the wall-clock times."""
  records = metrics.read_metrics(workdir)
  for record in records:
    del record['elapsed_s']
  return records


def _final_state(workdir):
  path = pathlib.Path(workdir) / checkpoint.CHECKPOINT_DIR / str(NUM_ROUNDS) / 'state'
  return ocp.StandardCheckpointer().restore(path.absolute())


def _assert_same_run(workdir, reference):
  assert _records(workdir) == _records(reference)
  assert [r['round'] for r in _records(workdir)] == list(range(NUM_ROUNDS + 1))
  expected = jax.tree.leaves_with_path(_final_state(reference))
  actual = jax.tree.leaves_with_path(_final_state(workdir))
  assert [path for path, _ in actual] == [path for path, _ in expected]
  for (path, a), (_, b) in zip(actual, expected):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def _checkpoint_rounds(workdir):
  folder = pathlib.Path(workdir) / checkpoint.CHECKPOINT_DIR
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _edit_saved_config(workdir, **changes):
  """Rewrites the config recorded in each checkpoint, as if another config wrote it."""
  for meta_file in (pathlib.Path(workdir) / checkpoint.CHECKPOINT_DIR).glob('*/meta/metadata'):
    meta = json.loads(meta_file.read_text())
    meta['config'].update(changes)
    meta_file.write_text(json.dumps(meta))


def test_throughput_leaves_out_the_compiling_first_round(reference):
  summary = json.loads((reference / 'summary.json').read_text())
  assert summary['timed_rounds'] == NUM_ROUNDS - 1
  assert 0 < summary['timed_seconds'] < summary['train_seconds']
  steps_per_round = summary['steps'] // NUM_ROUNDS
  assert summary['steps_per_second'] == pytest.approx(
      (NUM_ROUNDS - 1) * steps_per_round / summary['timed_seconds'])


def test_same_config_and_seed_reproduce_metrics_and_parameters(reference, tmp_path):
  # The workdir holds another config's checkpoints and metrics, which the
  # second run must refuse, and then with fresh=True delete instead of resuming.
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
  _edit_saved_config(tmp_path, seed=1)
  with pytest.raises(checkpoint.CheckpointError, match=r'different config: seed 1 -> 0\.'):
    train.run(tiny.config(), tmp_path)
  train.run(tiny.config(), tmp_path, fresh=True)
  _assert_same_run(tmp_path, reference)


def _environment():
  """The session's, which names its compilation cache, and this checkout's package."""
  return {**os.environ, 'PYTHONPATH': str(pathlib.Path(mocosfl_jax.__file__).parent.parent)}


def _start(tmp_path, workdir, name, *flags):
  """Starts the command line on the tiny config; output goes to ``tmp_path/name.log``."""
  config_file = tmp_path / 'tiny.py'
  config_file.write_text(CONFIG_FILE)
  log = open(tmp_path / f'{name}.log', 'w')
  command = [sys.executable, '-m', 'mocosfl_jax.main', f'--config={config_file}',
             f'--workdir={workdir}', *flags]
  process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                             env=_environment(), cwd=tmp_path)
  log.close()
  return process


def _wait_until(process, condition, what):
  """Polls ``condition`` until it holds while ``process`` still runs."""
  deadline = time.monotonic() + DEADLINE_S
  while not condition():
    assert process.poll() is None, f'the run ended (status {process.returncode}) before {what}'
    assert time.monotonic() < deadline, f'no {what} after {DEADLINE_S} s'
    try:  # returns at once if the run ends, else re-checks the condition
      process.wait(timeout=0.02)
    except subprocess.TimeoutExpired:
      pass


def _last_record_round(workdir):
  path = pathlib.Path(workdir) / metrics.METRICS_FILENAME
  rounds = [-1]
  for line in path.read_text().splitlines() if path.exists() else []:
    try:
      rounds.append(json.loads(line)['round'])
    except json.JSONDecodeError:  # the line being written
      pass
  return max(rounds)


def test_resume_after_sigterm_sigkill_and_corruption_matches_uninterrupted_run(
    reference, tmp_path, caplog):
  workdir = tmp_path / 'run'
  checkpoints = workdir / checkpoint.CHECKPOINT_DIR

  # SIGTERM once round 0 is logged, during round 1. With checkpoints due only
  # every 5 rounds, the checkpoint it leaves is the one the signal asks for.
  first = _start(tmp_path, workdir, 'sigterm', '--config.checkpoint.every=5')
  _wait_until(first, lambda: _last_record_round(workdir) >= 0, 'round 0')
  first.send_signal(signal.SIGTERM)
  assert first.wait(DEADLINE_S) == 128 + signal.SIGTERM
  rounds = _checkpoint_rounds(workdir)
  assert len(rounds) == 1, f'checkpoints after SIGTERM: {rounds}'
  stopped = rounds[0]
  # Later would leave the run below no checkpoint of its own before round 5.
  assert stopped < 4
  output = (tmp_path / 'sigterm.log').read_text()
  assert f'stopped by SIGTERM after round {stopped}; its checkpoint is saved' in output
  assert _last_record_round(workdir) == stopped

  # Resumed with checkpoints every 2 rounds, so that its metrics run ahead of
  # its checkpoints: SIGKILL once round 5 is logged and 4 saved, in round 6 or later.
  second = _start(tmp_path, workdir, 'sigkill', '--config.checkpoint.every=2')
  _wait_until(second, lambda: _last_record_round(workdir) >= 5 and (checkpoints / '4').exists(),
              'round 5')
  second.kill()
  assert second.wait(DEADLINE_S) == -signal.SIGKILL
  assert f'resuming from the checkpoint of round {stopped}' in (
      tmp_path / 'sigkill.log').read_text()
  rounds = _checkpoint_rounds(workdir)
  newest, previous = rounds[-1], rounds[-2]
  assert newest in (4, 6) and 5 <= _last_record_round(workdir) < NUM_ROUNDS

  # The newest checkpoint is damaged: the same command again, in-process,
  # sets it aside, resumes from the one before and completes the run.
  for file in (checkpoints / str(newest) / 'state').rglob('d/*'):
    file.write_bytes(file.read_bytes()[:10])
  with caplog.at_level(logging.INFO, logger='mocosfl_jax'):
    train.run(tiny.config(), workdir)
  assert f'checkpoint of round {newest} is unreadable' in caplog.text
  assert f'resuming from the checkpoint of round {previous}' in caplog.text
  (set_aside,) = (workdir / checkpoint.CORRUPT_DIR).iterdir()
  assert set_aside.name.startswith(f'{newest}.')
  _assert_same_run(workdir, reference)
  # Throughput leaves out the first round of each process whose rounds the
  # final state descends from: the SIGTERM one, the SIGKILL one if it saved
  # the checkpoint resumed from, and the last.
  processes = 3 if previous > stopped else 2
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['timed_rounds'] == NUM_ROUNDS - processes


def _cli(tmp_path, workdir, *flags):
  process = _start(tmp_path, workdir, 'cli', *flags)
  status = process.wait(DEADLINE_S)
  return status, (tmp_path / 'cli.log').read_text()


def _assert_one_error_line(output, *parts):
  errors = [line for line in output.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and output.endswith(errors[0] + '\n'), output
  assert 'Traceback' not in output
  for part in parts:
    assert part in errors[0]


def test_cli_refuses_a_checkpoint_of_another_config(reference, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(reference / checkpoint.CHECKPOINT_DIR / str(NUM_ROUNDS),
                  workdir / checkpoint.CHECKPOINT_DIR / str(NUM_ROUNDS))
  status, output = _cli(tmp_path, workdir, '--config.moco.temperature=0.2')
  assert status == 1
  _assert_one_error_line(output, f'(round {NUM_ROUNDS}) of a different config',
                         'moco.temperature 0.1 -> 0.2', '--fresh')
  assert _checkpoint_rounds(workdir) == [NUM_ROUNDS]


def test_cli_rejects_a_bad_config_value(tmp_path):
  status, output = _cli(tmp_path, tmp_path / 'run', '--config.num_clients=0')
  assert status == 1
  _assert_one_error_line(output, 'num_clients')
  assert not (tmp_path / 'run').exists()


def test_non_finite_state_stops_the_run_and_keeps_the_checkpoints(
    reference, tmp_path, monkeypatch):
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
  for r in _checkpoint_rounds(tmp_path)[1:]:
    shutil.rmtree(tmp_path / checkpoint.CHECKPOINT_DIR / str(r))
  resumed = _checkpoint_rounds(tmp_path)[0]
  build = train.build

  def diverging_build(config, edge=None):
    """The experiment, with a NaN in one server weight after each round."""
    experiment = build(config, edge)
    run_round = experiment.run_round

    def diverging_round(state, data, key):
      state, step_metrics = run_round(state, data, key)
      leaves, tree = jax.tree.flatten(state.server)
      leaves[-1] = leaves[-1].at[(0,) * leaves[-1].ndim].set(jnp.nan)
      return state.replace(server=jax.tree.unflatten(tree, leaves)), step_metrics

    return dataclasses.replace(experiment, run_round=diverging_round)

  monkeypatch.setattr(train, 'build', diverging_build)
  with pytest.raises(FloatingPointError) as error:
    train.run(tiny.config(), tmp_path)
  assert str(error.value) == (
      f'non-finite parameters in round {resumed + 1} '
      f'(steps {2 * resumed + 1}-{2 * resumed + 2}); the checkpoint of round {resumed} is kept')
  assert _checkpoint_rounds(tmp_path) == [resumed]
  assert _last_record_round(tmp_path) == resumed


def _tree(float32=jnp.ones((3, 2)), bfloat16=jnp.zeros(4, jnp.bfloat16)):
  return {'float32': float32, 'more': [bfloat16, jnp.arange(3)], 'empty': ()}


@pytest.mark.parametrize('bad', [jnp.nan, jnp.inf, -jnp.inf])
def test_all_finite_finds_a_non_finite_leaf(bad):
  assert bool(train.all_finite(_tree()))
  assert not bool(train.all_finite(_tree(float32=jnp.ones((3, 2)).at[1, 0].set(bad))))
  assert not bool(train.all_finite(_tree(bfloat16=jnp.zeros(4, jnp.bfloat16).at[3].set(bad))))


def test_all_finite_of_integers_only():
  assert bool(train.all_finite({'steps': jnp.arange(3), 'empty': ()}))
