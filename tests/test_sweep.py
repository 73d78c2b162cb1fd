"""Seed sweeps (experiments/sweep.py): run s of a sweep is the single run with its seed."""
import dataclasses
import os
import sys

from absl import flags
import jax
import numpy as np
import pytest

from mocosfl_jax import cli
from mocosfl_jax import train
from mocosfl_jax.config_checks import ConfigError

import tiny

# experiments/ is a folder of commands, not an installed package.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
from experiments import sweep as sweep_lib  # noqa: E402  pylint: disable=wrong-import-position

RUNS = 2
# One round: two steps agree to about 5e-6 of each field's largest value
# compiled optimised; unoptimised (the suite's programs, conftest.py) the
# vmapped sweep and the single run round differently, up to 1.4e-3 of it (a
# GroupNorm bias's momentum). Another seed's init differs by the whole value.
# A second round amplifies float rounding to percents in the tiny run's
# momentum buffers, as much between the engine's own 'scan' and 'loop' rounds.
ROUNDS = 1
FIELD_ATOL = 1e-2


@pytest.fixture(scope='module')
def swept():
  """A sweep of seeds 0 and 1 of the tiny config after ROUNDS rounds: (sweep, states, metrics)."""
  sweep = sweep_lib.build(tiny.config(), RUNS)
  states, keys = sweep.init()
  for _ in range(ROUNDS):
    states, metrics = sweep.run_round(states, sweep.data, keys)
  return sweep, states, metrics


def single_run(seed: int):
  """(experiment, state, last round's metrics) of train.run's rounds with ``seed``, no outputs."""
  exp = train.build(tiny.config(seed=seed))
  init_key, round_key = jax.random.split(jax.random.key(seed))
  state, data = exp.init_state(init_key), exp.client_data()
  for _ in range(ROUNDS):
    state, metrics = exp.run_round(state, data, round_key)
  return exp, state, metrics


def assert_trees_close(actual, expected):
  """Integers equal, floats within FIELD_ATOL of each field's largest value."""
  paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(expected)[0])
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for path, a, e in zip(paths, jax.tree.leaves(actual), leaves):
    a, e = np.asarray(a), np.asarray(e)
    if np.issubdtype(e.dtype, np.floating):
      np.testing.assert_allclose(a, e, rtol=0, atol=FIELD_ATOL * np.abs(e).max(),
                                 err_msg=jax.tree_util.keystr(path))
    else:
      np.testing.assert_array_equal(a, e, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('run', range(RUNS))
def test_run_s_of_the_sweep_is_the_single_run_with_its_seed(swept, run):
  sweep, states, metrics = swept
  assert sweep.seeds == (0, 1)
  exp, state, single_metrics = single_run(sweep.seeds[run])
  # Its seed's own partition, not the first seed's.
  np.testing.assert_array_equal(sweep.data.table[run], exp.client_data().table)
  np.testing.assert_allclose(metrics['loss'][run], single_metrics['loss'], rtol=2e-5)
  # Every field: server, client models, optimisers, step counts, queue, round.
  assert_trees_close(sweep_lib.take(states, run), state)


def test_the_runs_differ(swept):
  sweep, states, metrics = swept
  assert not np.array_equal(sweep.data.table[0], sweep.data.table[1])
  assert not np.allclose(metrics['loss'][0], metrics['loss'][1])
  assert not np.allclose(states.queue.keys[0], states.queue.keys[1])


def test_seeds_must_share_the_partition_layout(monkeypatch):
  # No partition of the project sizes its clients by the seed: one that did.
  real = sweep_lib.partition_for
  def seed_sized(exp, seed):
    part = real(exp, seed)
    return dataclasses.replace(part, client_indices=[ix[:len(ix) - seed]
                                                     for ix in part.client_indices])
  monkeypatch.setattr(sweep_lib, 'partition_for', seed_sized)
  with pytest.raises(ConfigError, match=r'^seeds 0 and 1 partition the data with different '
                                        r'table width \(142 and 141\)'):
    sweep_lib.build(tiny.config(), 2)
  with pytest.raises(ConfigError, match='^init.from_workdir: a sweep starts each run'):
    sweep_lib.resolved(tiny.config(**{'init.from_workdir': '/tmp/run'}))
  # On one device whatever the host has: the images must lie by sample id.
  with pytest.raises(ConfigError, match='^mesh.devices=2: a sweep runs on one device'):
    sweep_lib.resolved(tiny.config(**{'mesh.devices': 2}))
  assert sweep_lib.resolved(tiny.config(**{'mesh.devices': 0})).mesh.devices == 1


def parse(*args) -> dict:
  argv = ['sweep', f'--config={REPO}/configs/quickstart.py', *args]
  flag_values = flags.FlagValues()
  values = sweep_lib.define_flags(flag_values, argv)
  cli.parse_flags(argv, flag_values=flag_values, config_flag='config')
  return values


def test_flag_mistakes_are_one_line(tmp_path):
  values = parse('--seeds=3', '--rounds=1', f'--out={tmp_path}/s.json',
                 '--config.model.width=0.0625')
  assert values['seeds'].value == 3 and values['config'].value.model.width == 0.0625
  with pytest.raises(SystemExit) as exited:
    parse('--seeds=0', f'--out={tmp_path}/s.json')
  assert str(exited.value) == 'error: --seeds=0: 0 is not a positive integer'
  with pytest.raises(SystemExit) as exited:
    sweep_lib.main(parse('--out=/proc/no/s.json'))
  assert str(exited.value).startswith('error: --out=/proc/no/s.json')
