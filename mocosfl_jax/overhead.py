"""Per-client communication of a MocoSFL run, counted explicitly per direction (spec 7.1, 9.25)."""
from __future__ import annotations

BYTES_PER_FLOAT = 4


def communication_per_client(*, rounds: int, pool_size: int, num_clients: int,
                             steps_per_round: int, batch_size: int, smashed_floats: int,
                             client_params: int, sync_every: int) -> dict:
  """Expected megabytes (2^20 bytes) one client sends and receives over a run.

  Per step in the pool: up the query and key smashed data, down the query's
  gradient. Per FedAvg: the client model up and the average down.
  """
  rounds_in_pool = rounds * pool_size / num_clients
  images = rounds_in_pool * steps_per_round * batch_size
  syncs = rounds_in_pool * -(-steps_per_round // sync_every)
  mb = BYTES_PER_FLOAT / 2**20
  up = (2 * images * smashed_floats + syncs * client_params) * mb
  down = (images * smashed_floats + syncs * client_params) * mb
  return {'upload_mb': up, 'download_mb': down, 'total_mb': up + down,
          'rounds_in_pool': rounds_in_pool}
