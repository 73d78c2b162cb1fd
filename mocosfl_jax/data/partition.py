"""Splitting a training set across clients (spec 2.3).

Partitions are plain numpy index arrays computed once on the host; the engine
receives them as a padded (num_clients, max_size) matrix plus per-client counts.
"""
from __future__ import annotations

import numpy as np


def iid(num_samples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
  """Equal contiguous slices of a random permutation; the remainder is dropped."""
  per_client = num_samples // num_clients
  order = rng.permutation(num_samples)
  return [order[i * per_client:(i + 1) * per_client] for i in range(num_clients)]


def class_shards(labels: np.ndarray, num_clients: int, classes_per_client: int,
                 rng: np.random.Generator) -> list[np.ndarray]:
  """The paper's pathological non-IID split.

  Sort indices by label, cut them into ``classes_per_client * num_clients``
  equal contiguous shards, and give every client ``classes_per_client`` shards
  drawn without replacement. A client holds at most that many classes (two of
  its shards may come from the same class).
  """
  num_shards = classes_per_client * num_clients
  shard_size = len(labels) // num_shards
  by_label = np.argsort(labels, kind='stable')
  shard_ids = rng.permutation(num_shards).reshape(num_clients, classes_per_client)
  return [np.concatenate([by_label[s * shard_size:(s + 1) * shard_size] for s in shards])
          for shards in shard_ids]


def padded(client_indices: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """(num_clients, max_size) int32 index matrix (padded with -1) and counts."""
  counts = np.array([len(ix) for ix in client_indices], np.int32)
  table = np.full((len(client_indices), max(counts.max(), 1)), -1, np.int32)
  for row, ix in zip(table, client_indices):
    row[:len(ix)] = ix
  return table, counts
