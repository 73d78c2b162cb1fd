"""One run over many processes (hosts): ``jax.distributed.initialize`` and who writes.

Every process runs the same program on the same config and seed. The mesh
(sharding.py) then spans the devices of all processes, every process takes
the same pool draws (they come from PRNG keys, not from the host), and the
collectives of a round (FedAvg, the server's gradient) cross processes.
Process 0, the primary, alone writes the workdir's files, prints and logs;
every process takes part in saving and restoring checkpoints, which orbax
coordinates.

Without flags a process joins a cluster only where its scheduler says it is
one of many (SLURM's srun, Open MPI's mpirun, a Cloud TPU VM): JAX then
reads the coordinator, the process count and the process's id from that
environment. A plain machine runs as one process, without waiting on anything.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib

import jax
import numpy as np
from jax.experimental import multihost_utils

from mocosfl_jax.config_checks import ConfigError

# Variables that SLURM's srun sets in every task it starts (jax's SlurmCluster reads them).
SLURM_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
              'SLURM_LOCALID')
# Set in every process that Open MPI's mpirun starts.
OMPI_URI = 'OMPI_MCA_orte_hnp_uri'
# GKE's TPU pods set these; a Cloud TPU VM has /dev/accel* or /dev/vfio and
# JAX reads its workers from the VM's metadata server.
TPU_VARS = ('TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES', 'MEGASCALE_COORDINATOR_ADDRESS')


@dataclasses.dataclass(frozen=True)
class Flags:
  """``--coordinator_address``, ``--num_processes`` and ``--process_id``; None when absent."""
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  @property
  def given(self) -> bool:
    return any(v is not None for v in dataclasses.astuple(self))


def check(flags: Flags, environ=None) -> None:
  """Refuses flags that cannot start a run.

  Raises:
    ConfigError: a process id without a process count or out of its range, a
      count below 1, or a count above 1 without a coordinator.
  """
  n, i = flags.num_processes, flags.process_id
  cluster = detected_cluster(environ)
  if n is not None and n < 1:
    raise ConfigError(f'--num_processes={n}: pass 1 or more')
  if i is not None and n is None:
    raise ConfigError(f'--process_id={i} needs --num_processes (the number of processes)')
  if i is not None and not 0 <= i < n:
    raise ConfigError(f'--process_id={i} is not in 0..{n - 1} (--num_processes={n})')
  if n is not None and n > 1 and i is None and cluster is None:
    raise ConfigError(f'--num_processes={n} needs --process_id (0..{n - 1}) outside a '
                      'SLURM, Open MPI or Cloud TPU job')
  if n is not None and n > 1 and not flags.coordinator_address and cluster is None:
    raise ConfigError(f'--num_processes={n} needs --coordinator_address=HOST:PORT (process '
                      "0's host) outside a SLURM, Open MPI or Cloud TPU job")


def detected_cluster(environ=None) -> str | None:
  """The scheduler that started this process as one of several, if any.

  From environment variables (and TPU device files) only: no network query,
  so a plain machine learns it is not in a cluster at once. A SLURM or Open
  MPI job of one task counts as none.
  """
  environ = os.environ if environ is None else environ
  if all(v in environ for v in SLURM_VARS) and int(environ['SLURM_NTASKS']) > 1:
    return 'SLURM'
  if OMPI_URI in environ and int(environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return 'Open MPI'
  if any(v in environ for v in TPU_VARS) or _tpu_vm():
    return 'Cloud TPU'
  return None


def _tpu_vm() -> bool:
  return pathlib.Path('/dev/accel0').exists() or pathlib.Path('/dev/vfio/0').exists()


def initialize(flags: Flags, environ=None) -> bool:
  """Joins the processes of a run, as the flags or the cluster's environment say.

  Call it before anything touches a JAX device. Returns whether JAX's
  distributed system was started (one process without flags or cluster: no).

  Raises:
    ConfigError: flags that cannot start a run (:func:`check`).
  """
  check(flags, environ)
  if flags.num_processes == 1 or not (flags.given or detected_cluster(environ)):
    return False
  # Collectives between processes' CPU devices (the CPU backend's default
  # does not cross processes); GPU and TPU backends bring their own.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(flags.coordinator_address, flags.num_processes, flags.process_id)
  return True


def is_primary() -> bool:
  """Whether this process writes the run's files, prints and logs: process 0."""
  return jax.process_index() == 0


def many() -> bool:
  return jax.process_count() > 1


def barrier(name: str) -> None:
  """Waits until every process gets here (nothing to wait for with one process)."""
  if many():
    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def primary_first(name: str):
  """Runs the block in process 0 before the others, e.g. filling a shared cache.

  The others wait until process 0 is through, even when it failed, so that
  they meet the same error (with their own message) rather than hang.
  """
  if not is_primary():
    barrier(name)
  try:
    yield
  finally:
    if is_primary():
      barrier(name)


def agreed(flag: bool) -> bool:
  """Process 0's ``flag`` on every process.

  For a decision that each process computes and all must take alike, such as
  whether a kNN accuracy is a new best (then all of them save the model).
  """
  if not many():
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def from_primary(value: float) -> float:
  """Process 0's ``value`` on every process: its own on process 0, float32's on the others.

  Only process 0's is written (to records, summaries and checkpoints), so the
  others' float32 rounding never shows.
  """
  if not many():
    return value
  told = float(multihost_utils.broadcast_one_to_all(np.float32(value)))
  return value if is_primary() else told


def anyone(flag: bool) -> bool:
  """Whether ``flag`` holds on any process (a signal that reached only some of them)."""
  if not many():
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def to_host(tree):
  """``tree``'s arrays as numpy arrays, also those split over other processes' devices."""
  if not many():
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
