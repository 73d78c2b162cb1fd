"""test_sharding's runs, on 8 simulated CPU devices: ``python sharded_run.py DIR``.

A subprocess because the device count is fixed when JAX starts. In ``DIR``:
``one`` and ``eight`` train the same config from round 0 with the mesh over
1 and over 8 devices; ``one_then_eight`` resumes ``one``'s checkpoint of
round 1 on 8 devices and ``eight_then_one`` resumes ``eight``'s on 1. With
``mesh.devices=1`` a run compiles the program of a one-device process.
Programs compile as the suite's do (conftest.py's XLA_FLAGS, inherited).
"""
import os
import pathlib
import shutil
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=8')

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from mocosfl_jax import checkpoint, train  # pylint: disable=wrong-import-position
from mocosfl_jax.data import partition  # pylint: disable=wrong-import-position

import test_sharding  # pylint: disable=wrong-import-position


def run(workdir: pathlib.Path, devices: int) -> None:
  config = test_sharding.config()
  config.mesh.devices = devices
  train.run(config, workdir)


def from_round_one(source: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
  """A copy of ``source`` whose newest checkpoint is round 1's: a run there resumes from it."""
  shutil.copytree(source, target)
  shutil.rmtree(target / checkpoint.CHECKPOINT_DIR / '2')
  return target


def check_each_device_holds_and_reads_only_its_clients() -> None:
  """Device d of the mesh holds the images of clients 2d and 2d + 1, read for it alone."""
  config = test_sharding.config()
  exp = train.build(config)
  table, _ = partition.padded(exp.partition.client_indices)
  reads = []
  images = exp.layout.client_images(
      table, lambda ids: reads.append(ids) or exp.read_images(ids), exp.train.images.shape[1:])
  per_device = config.num_clients // 8
  devices = list(exp.layout.mesh.devices.flat)
  expected_reads = []
  for shard in images.addressable_shards:
    d = devices.index(shard.device)
    ids = table[d * per_device:(d + 1) * per_device].reshape(-1)
    rows = shard.index[0]
    assert (rows.start, rows.stop) == (d * ids.size, (d + 1) * ids.size), (d, rows)
    np.testing.assert_array_equal(np.asarray(shard.data)[ids >= 0],
                                  exp.train.images[ids[ids >= 0]])
    expected_reads.append(sorted(ids[ids >= 0]))
  assert sorted(map(sorted, reads)) == sorted(expected_reads), reads


def main(directory: pathlib.Path) -> None:
  assert len(jax.devices()) == 8, jax.devices()
  check_each_device_holds_and_reads_only_its_clients()
  # The session's persistent cache, as conftest.py sets it in the test process.
  if 'JAX_COMPILATION_CACHE_DIR' in os.environ:
    jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  run(directory / 'one', 1)
  run(directory / 'eight', 8)
  run(from_round_one(directory / 'one', directory / 'one_then_eight'), 8)
  run(from_round_one(directory / 'eight', directory / 'eight_then_one'), 1)


if __name__ == '__main__':
  main(pathlib.Path(sys.argv[1]))
