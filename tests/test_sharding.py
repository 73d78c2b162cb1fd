"""The client axis over many devices: the mesh, its refusals, and numbers that do not depend on it."""
import dataclasses
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental import multihost_utils

from mocosfl_jax import checkpoint, distributed, sharding, train
from mocosfl_jax.data import sources
from mocosfl_jax.evaluation import final
from mocosfl_jax.config_checks import ConfigError

import tiny


def config():
  """Tiny, with 16 clients, 8 a round (a drawn pool, so rows are gathered and
  scattered) and a queue per client: all divide by 8 devices."""
  return tiny.config(**{'num_clients': 16, 'client_sample_ratio': 0.5,
                        'moco.feature_sharing': False, 'num_rounds': 2})


def test_one_device_has_no_mesh():
  assert sharding.layout(config(), pool_size=8) is None


def test_more_devices_than_exist_are_refused():
  c = config()
  c.mesh.devices = len(jax.local_devices()) + 1
  with pytest.raises(ConfigError, match=r'^mesh.devices=\d+ but only \d+ local devices'):
    sharding.layout(c, pool_size=8)


def test_counts_the_devices_do_not_divide_are_refused():
  with pytest.raises(ConfigError, match=r'num_clients=12 and the pool .* = 6\) must both be '
                                        r'multiples of the 8 devices'):
    sharding.check_divisible(12, 6, 8)
  sharding.check_divisible(16, 8, 8)


def test_per_client_leaves_are_split_and_the_rest_replicated():
  exp_state = jax.eval_shape(train.build(config()).init_state, jax.random.key(0))
  layout = sharding.Layout(jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (sharding.AXIS,)))
  specs = jax.tree.map(lambda s: s.spec, layout.state(exp_state))
  assert all(s == jax.sharding.PartitionSpec(sharding.AXIS) for s in jax.tree.leaves(specs.clients))
  assert all(s == jax.sharding.PartitionSpec(sharding.AXIS) for s in jax.tree.leaves(specs.queue))
  others = (specs.server, specs.server_ema, specs.server_opt, specs.round, specs.step)
  assert all(s == jax.sharding.PartitionSpec() for s in jax.tree.leaves(others))


def test_client_images_hold_each_clients_share_and_read_only_it():
  images = np.arange(7 * 2 * 2 * 3, dtype=np.uint8).reshape(7, 2, 2, 3)
  table = np.array([[5, 0, -1], [2, 6, 3], [-1, -1, -1], [1, -1, -1]], np.int32)
  layout = sharding.Layout(jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (sharding.AXIS,)))
  asked = []
  read = lambda ids: asked.append(ids) or images[ids]
  placed = np.asarray(layout.client_images(table, read, images.shape[1:]))
  np.testing.assert_array_equal(np.concatenate(asked), [5, 0, 2, 6, 3, 1])
  rows = sharding.client_major(table)
  present = table >= 0
  np.testing.assert_array_equal(rows >= 0, present)
  np.testing.assert_array_equal(placed[rows[present]], images[table[present]])
  assert not placed[np.flatnonzero(~present.reshape(-1))].any()


def _one_device_mesh_experiment():
  exp = train.build(config())
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (sharding.AXIS,))
  return dataclasses.replace(exp, layout=sharding.Layout(mesh))


def test_the_table_reads_auxiliary_images_after_the_targets():
  exp = _one_device_mesh_experiment()
  aux = np.full((3,) + exp.train.images.shape[1:], 7, np.uint8) * np.arange(3)[:, None, None, None]
  exp = dataclasses.replace(exp, aux=sources.Split(aux.astype(np.uint8), np.zeros(3, np.int32),
                                                   ('a',)))
  n = len(exp.train)
  np.testing.assert_array_equal(exp.read_images(np.array([n + 2, 5, n])),
                                [aux[2], exp.train.images[5], aux[0]])


def test_processes_other_than_zero_hold_no_evaluation_data_and_get_its_knn(monkeypatch):
  exp = _one_device_mesh_experiment()
  monkeypatch.setattr(distributed, 'many', lambda: True)
  monkeypatch.setattr(multihost_utils, 'broadcast_one_to_all', lambda x: np.float32(61.3))
  monkeypatch.setattr(final, 'knn_accuracy', lambda *args: pytest.fail('evaluated'))
  monkeypatch.setattr(distributed, 'is_primary', lambda: False)
  assert exp.bank_images(exp.client_data()) is None and exp.test_images() is None
  assert train.knn_on_primary(exp, None, None, None) == float(np.float32(61.3))
  # Process 0 keeps its own value, which it writes, not float32's.
  monkeypatch.setattr(distributed, 'is_primary', lambda: True)
  assert distributed.from_primary(61.3) == 61.3


def _losses(workdir):
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [r['loss'] for r in records if 'loss' in r]


def state(workdir, round_, abstract):
  """The state of ``workdir``'s checkpoint of ``round_``, on one device."""
  manager = ocp.CheckpointManager((workdir / checkpoint.CHECKPOINT_DIR).absolute(),
                                  item_names=('state', 'meta'))
  try:
    return jax.device_get(manager.restore(round_, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract))).state)
  finally:
    manager.close()


def _assert_close(state, expected, atol, name):
  for part in ('server', 'server_ema', 'server_opt', 'clients', 'queue'):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=atol,
                                                         err_msg=f'{name} {part}'),
                 getattr(state, part), getattr(expected, part))


def test_eight_devices_give_the_numbers_of_one_and_resume_across_counts(sharded_runs):
  tmp_path = sharded_runs
  one, eight = tmp_path / 'one', tmp_path / 'eight'
  abstract = train.on_device(jax.eval_shape(train.build(config()).init_state, jax.random.key(0)))
  for name in ('eight', 'one_then_eight', 'eight_then_one'):
    np.testing.assert_allclose(_losses(tmp_path / name), _losses(one), rtol=1e-3, err_msg=name)
  # A round on 8 devices sums in another order than on 1: its state agrees to
  # float rounding (5e-7 seen).
  _assert_close(state(eight, 1, abstract), state(one, 1, abstract), 1e-5, 'round 1')
  # A resumed round agrees with the uninterrupted one. Not as closely for
  # eight's checkpoint: from it, the tiny model's second round amplifies
  # rounding differences to 3e-3 (two rounds in memory, without checkpoints,
  # differ as much).
  _assert_close(state(tmp_path / 'one_then_eight', 2, abstract), state(one, 2, abstract),
                1e-4, 'one_then_eight')
  _assert_close(state(tmp_path / 'eight_then_one', 2, abstract), state(eight, 2, abstract),
                2e-2, 'eight_then_one')
