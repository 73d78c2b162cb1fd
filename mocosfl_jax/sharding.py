"""The device mesh of a run and where each part of the SimState lives on it.

One 1-D mesh over ``config.mesh.devices`` local devices, its axis named
``clients``. Every per-client leaf of the state (online and EMA client
models, their optimiser states, step counters, per-client queues and
attackers) is split along its leading client axis; a round's pool rows (the
gathered per-client state, its batch of images and so the server batch) are
split along the same axis, now over the pool. The server, its EMA, its
optimiser, a shared queue, the counters and the partition's table are
replicated. So each device trains ``pool_size / devices`` clients, the
server's batch is data-parallel over the devices, and FedAvg and the server's
gradient are all-reduces.

The training images are split with their clients (:meth:`Layout.client_images`):
a device holds the images of the clients whose state it holds. A round's
pool is redrawn every round and its rows go to the devices by position, so
a step's images reach the device that trains them in one all-reduce of the
step's batch (never of the whole table), as its pool rows' state does.

With many processes (distributed.py) the mesh spans every process's devices
and ``mesh.devices`` counts them all. Each process then holds, and reads
from disk, only its devices' rows of the per-client leaves and the images of
its devices' clients, and a copy of the replicated leaves (README, "Many
hosts").

With one device :func:`layout` is None and the round compiles exactly as
without a mesh. Partitioning changes only the order of floating-point sums,
so the numbers do not depend on the device count beyond float rounding.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mocosfl_jax.config_checks import ConfigError

AXIS = 'clients'


def num_devices(config) -> int:
  """``mesh.devices``, or every device when it is 0 (every process's, with many)."""
  if jax.process_count() > 1:
    available = len(jax.devices())
    if config.mesh.devices not in (0, available):
      raise ConfigError(f'mesh.devices={config.mesh.devices} but the mesh of '
                        f'{jax.process_count()} processes spans all their {available} devices: '
                        'pass 0')
    return available
  available = len(jax.local_devices())
  wanted = config.mesh.devices or available
  if wanted > available:
    raise ConfigError(f'mesh.devices={wanted} but only {available} local devices '
                      f'({jax.default_backend()}) exist; pass 0 to use them all')
  return wanted


def put(x, sharding: NamedSharding):
  """``x`` (host or one process's device array) laid out as ``sharding``.

  ``jax.device_put`` cannot place a committed array or a PRNG key onto
  devices of other processes; every process builds its own devices' shards
  from its copy of ``x`` instead, which all processes hold alike.
  """
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding),
                                    impl=jax.random.key_impl(x))
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def client_major(table: np.ndarray) -> np.ndarray:
  """``table``'s (num_clients, slots) sample ids as rows of :meth:`Layout.client_images`.

  The same positions stay valid (and -1 padded), so a client's walk through
  its data picks the same images from either table.
  """
  return np.where(table >= 0, np.arange(table.size, dtype=table.dtype).reshape(table.shape), -1)


def check_divisible(num_clients: int, pool_size: int, devices: int) -> None:
  """Refuses client and pool counts that the devices cannot split evenly."""
  if num_clients % devices or pool_size % devices:
    raise ConfigError(
        f'num_clients={num_clients} and the pool (num_clients x client_sample_ratio = '
        f'{pool_size}) must both be multiples of the {devices} devices of the mesh: change '
        'num_clients or client_sample_ratio, or set mesh.devices (1 runs on one device)')


@dataclasses.dataclass(frozen=True)
class Layout:
  """The shardings of the state, the pool's rows and the data on one mesh."""
  mesh: Mesh

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  @property
  def rows(self) -> NamedSharding:
    """The leading axis split over the devices."""
    return NamedSharding(self.mesh, PartitionSpec(AXIS))

  def _by_rank(self, x) -> NamedSharding:
    return self.rows if np.ndim(x) else self.replicated

  def state(self, state):
    """The shardings of a SimState, whole or narrowed to a pool (same tree)."""
    everything = jax.tree.map(lambda _: self.replicated, state)
    clients = jax.tree.map(self._by_rank, state.clients)
    queue = (jax.tree.map(self._by_rank, state.queue) if state.queue.per_client
             else everything.queue)
    return everything.replace(clients=clients, queue=queue)

  def place(self, state):
    """``state`` moved onto the mesh (a replicated leaf is copied to every device)."""
    return jax.tree.map(put, state, self.state(state))

  def abstract(self, abstract_state):
    """``jax.eval_shape``'s state with its shardings: what a checkpoint restores to."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_state, self.state(abstract_state))

  def constrain(self, state):
    """Inside a compiled function: ``state`` laid out as :meth:`state` says."""
    return jax.lax.with_sharding_constraint(state, self.state(state))

  def constrain_rows(self, x: jax.Array) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, self.rows)

  def client_images(self, table: np.ndarray, read: Callable[[np.ndarray], np.ndarray],
                    image_shape: tuple[int, ...]) -> jax.Array:
    """Every client's images, client by client, split over the devices with the clients.

    Row ``c * slots + k`` holds client c's k-th sample (``table[c, k]``, a
    (num_clients, slots) table of sample ids padded with -1) and zeros where
    the client has fewer, so :func:`client_major`'s table addresses it. A
    device's rows are those of its clients, and each process builds its
    devices' rows from ``read(sample_ids) -> uint8 images``, which is all it
    reads of the training set.
    """
    flat = table.reshape(-1)

    def rows(index):
      ids = flat[index[0]]
      out = np.zeros((len(ids),) + tuple(image_shape), np.uint8)
      present = ids >= 0
      out[present] = read(ids[present])
      return out
    return jax.make_array_from_callback((len(flat),) + tuple(image_shape), self.rows, rows)

  def replicate(self, tree):
    """``tree`` (host arrays, alike on every process) copied to every device."""
    return jax.tree.map(lambda x: put(x, self.replicated), tree)

  def local(self, tree):
    """A replicated ``tree``'s copy on this process's first device of the mesh."""
    return jax.tree.map(lambda x: x.addressable_data(0), tree)


def layout(config, pool_size: int) -> Layout | None:
  """The run's layout, or None on one device (the program without a mesh).

  Raises:
    ConfigError: more devices asked for than exist, or client or pool counts
      that do not divide by the device count.
  """
  devices = num_devices(config)
  if devices == 1:
    return None
  check_divisible(config.num_clients, pool_size, devices)
  every = jax.devices() if jax.process_count() > 1 else jax.local_devices()
  return Layout(Mesh(np.asarray(every[:devices]), (AXIS,)))
