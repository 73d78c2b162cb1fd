"""Splitting a training set across clients (spec 2.3 and 2.5).

Partitions are plain numpy index arrays computed once on the host; the engine
receives them as a padded (num_clients, max_size) matrix plus per-client counts.
:func:`make_partition` is the entry point; it reads ``config.data`` fields
partition, dirichlet_alpha, data_proportion and hetero.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from mocosfl_jax.data.sources import DataError

PARTITIONS = ('auto', 'iid', 'shards', 'dirichlet')

# Products such as 0.29 * 100 land just below an integer in floating point;
# the nudge keeps floor() from losing a whole class or sample to rounding.
_EPS = 1e-9


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
  its shards may come from the same class) when the shard size divides every
  class's count, as with CIFAR and the paper's client counts; otherwise, as in
  the reference, a shard can straddle two classes.
  """
  return _shards(labels, np.ones(num_clients, np.int64), classes_per_client, rng)


def _shards(labels: np.ndarray, units: np.ndarray, classes_per_client: int,
            rng: np.random.Generator) -> list[np.ndarray]:
  """Class shards where client i draws ``units[i] * classes_per_client`` shards."""
  draws = units * classes_per_client
  num_shards = int(draws.sum())
  shard_size = len(labels) // num_shards
  if shard_size < 1:
    raise DataError(f'{len(labels)} samples cut into {num_shards} shards leave less than one '
                    'image per shard: lower num_clients or noniid_ratio, or raise '
                    'data.data_proportion')
  by_label = np.argsort(labels, kind='stable')
  shard_ids = np.split(rng.permutation(num_shards), np.cumsum(draws)[:-1])
  return [np.concatenate([by_label[s * shard_size:(s + 1) * shard_size] for s in shards])
          for shards in shard_ids]


def dirichlet(labels: np.ndarray, sizes: np.ndarray, alpha: float,
              rng: np.random.Generator) -> list[np.ndarray]:
  """Dirichlet label skew with fixed client sizes (Hsu et al., 2019).

  Client i draws class proportions q_i ~ Dir(alpha * K * p), where p is the
  class frequency of ``labels`` over its K present classes (so with balanced
  classes every class has concentration ``alpha``), and takes ``sizes[i]``
  samples with those proportions from what is left. When a class runs out, its
  share goes to the client's other classes in proportion to q_i. Clients are
  served in random order, so that the late ones, which take what is left, are
  not always the same ids. Small alpha: few classes per client; large alpha:
  close to IID.
  """
  classes, counts = np.unique(labels, return_counts=True)
  remaining = counts.copy()
  concentration = alpha * len(classes) * counts / counts.sum()
  taken = np.zeros((len(sizes), len(classes)), np.int64)
  for client in rng.permutation(len(sizes)):
    q = rng.dirichlet(concentration)
    need = int(sizes[client])
    while need:
      available = remaining - taken[client]
      weights = q * (available > 0)
      if weights.sum() <= 0:
        weights = (available > 0).astype(np.float64)
      draw = np.minimum(rng.multinomial(need, weights / weights.sum()), available)
      taken[client] += draw
      need -= int(draw.sum())
    remaining -= taken[client]
  # Each class's samples keep their (random) order; clients take consecutive runs.
  starts = np.cumsum(taken, axis=0) - taken
  pools = [np.flatnonzero(labels == c) for c in classes]
  return [np.concatenate([pool[start:start + n] for pool, start, n in zip(pools, row_starts, row)])
          for row_starts, row in zip(starts, taken)]


def padded(client_indices: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """(num_clients, max_size) int32 index matrix (padded with -1) and counts."""
  counts = np.array([len(ix) for ix in client_indices], np.int32)
  table = np.full((len(client_indices), max(counts.max(), 1)), -1, np.int32)
  for row, ix in zip(table, client_indices):
    row[:len(ix)] = ix
  return table, counts


@dataclasses.dataclass(frozen=True)
class Hetero:
  """Parsed ``"A_B|C|D_E"`` (spec 2.5): the first ``num_rich`` clients are rich."""
  num_rich: int
  batch_multiplier: int
  rich_share: float  # fraction of the data that the rich clients hold together


def parse_hetero(hetero: str, num_clients: int) -> Hetero | None:
  """Parses the reference's hetero string; None when it is empty (hetero off).

  ``A_B|C|D_E``: a fraction A of the clients (the first int(A * num_clients)
  ids) are rich, use C times the batch size and together hold a fraction D of
  the data; B = 1 - A and E = 1 - D are the poor clients' complements.
  """
  if not hetero:
    return None
  usage = 'use "A_B|C|D_E" such as "0.2_0.8|16|0.8_0.2"'
  number = r'(\d*\.?\d+)'
  match = re.fullmatch(rf'{number}_{number}\|(\d+)\|{number}_{number}', hetero.strip())
  if match is None:
    raise DataError(f'data.hetero {hetero!r} is malformed: {usage}')
  a, b, c, d, e = (float(g) for g in match.groups())
  if abs(a + b - 1) > 1e-6 or abs(d + e - 1) > 1e-6:
    raise DataError(f'data.hetero {hetero!r}: A+B and D+E must each be 1: {usage}')
  num_rich = int(a * num_clients + _EPS)
  if not 0 < num_rich < num_clients:
    raise DataError(f'data.hetero {hetero!r} makes {num_rich} of {num_clients} clients rich: '
                    'choose A so that at least one client is rich and one is not')
  if c < 1 or not 0 < d < 1:
    raise DataError(f'data.hetero {hetero!r}: C must be >= 1 and D in (0, 1): {usage}')
  return Hetero(num_rich, int(c), d)


@dataclasses.dataclass(frozen=True, eq=False)  # Arrays make field-wise == ambiguous.
class Partition:
  """Which training samples each client holds, and its batch-size multiplier."""
  client_indices: list[np.ndarray]  # indices into the full training set
  batch_multiplier: np.ndarray  # int, (num_clients,); > 1 only for hetero rich clients
  method: str = ''  # how it was made, for partition.json

  @property
  def num_clients(self) -> int:
    return len(self.client_indices)

  def summary(self, labels: np.ndarray) -> dict:
    """Per-client sample and class counts plus aggregate statistics (JSON-serialisable).

    Args:
      labels: labels of the full training set that the indices point into.
    """
    labels = np.asarray(labels)
    sizes = np.array([len(ix) for ix in self.client_indices])
    clients, num_classes = [], []
    for ix, multiplier in zip(self.client_indices, self.batch_multiplier):
      classes, counts = np.unique(labels[ix], return_counts=True)
      num_classes.append(len(classes))
      clients.append({'samples': int(len(ix)), 'batch_multiplier': int(multiplier),
                      'class_counts': {str(c): int(n) for c, n in zip(classes, counts)}})

    def stats(values):
      values = np.asarray(values)
      return {'min': int(values.min()), 'max': int(values.max()),
              'mean': float(values.mean())}

    return {
        'method': self.method,
        'num_clients': self.num_clients,
        'num_samples': int(len(labels)),
        'assigned': int(sizes.sum()),
        'unassigned': int(len(labels) - sizes.sum()),
        'samples_per_client': stats(sizes),
        'classes_per_client': stats(num_classes),
        # Under hetero: how the data divides between rich and poor clients.
        'share_by_batch_multiplier': {
            str(m): float(sizes[self.batch_multiplier == m].sum() / max(sizes.sum(), 1))
            for m in np.unique(self.batch_multiplier)},
        'clients': clients,
    }


def _sizes(num_samples: int, num_clients: int, hetero: Hetero | None) -> np.ndarray:
  """Samples per client: equal, or hetero's rich/poor split of the data."""
  if hetero is None:
    sizes = np.full(num_clients, num_samples // num_clients)
  else:
    num_poor = num_clients - hetero.num_rich
    rich = int(hetero.rich_share * num_samples / hetero.num_rich + _EPS)
    poor = int((1 - hetero.rich_share) * num_samples / num_poor + _EPS)
    sizes = np.array([rich] * hetero.num_rich + [poor] * num_poor)
  if sizes.min() < 1:
    raise DataError(f'{num_samples} training samples cannot give each of {num_clients} clients '
                    'one: lower num_clients or data.hetero\'s D, or raise data.data_proportion')
  return sizes


def _shard_units(num_clients: int, hetero: Hetero | None) -> np.ndarray:
  """Shard draws per client, in "virtual clients" (spec 2.5).

  A rich client draws the shards of w virtual clients, with w rounded so that
  the rich clients together hold (close to) the fraction D of the data. Unlike
  the reference, every shard is handed out (spec 9.20).
  """
  units = np.ones(num_clients, np.int64)
  if hetero is not None:
    num_poor = num_clients - hetero.num_rich
    ratio = hetero.rich_share * num_poor / ((1 - hetero.rich_share) * hetero.num_rich)
    if round(ratio) < 1:
      raise DataError(f'data.hetero gives each rich client {ratio:.2f}x a poor client\'s data; '
                      'class shards need at least 1x: raise D')
    units[:hetero.num_rich] = round(ratio)
  return units


def make_partition(labels: np.ndarray, num_classes: int, num_clients: int, noniid_ratio: float,
                   data_config, seed: int) -> Partition:
  """Splits the training set across clients as ``data_config`` asks.

  Steps (spec 2.3): keep the first floor(data_proportion * n) indices of a
  random permutation; then split them by ``data_config.partition``:
  'iid' (contiguous slices), 'shards' (int(noniid_ratio * num_classes) class
  shards per client), 'dirichlet' (label skew with ``dirichlet_alpha``), or
  'auto' (iid when noniid_ratio == 1, else shards). One client gets the whole
  subset whatever the partition. ``data_config.hetero`` makes the first
  clients rich (spec 2.5 with the intended semantics of 9.20).

  Args:
    labels: (n,) integer labels of the full training set.
    num_classes: number of classes; labels must lie in [0, num_classes).
    num_clients: number of clients N.
    noniid_ratio: fraction of the classes each client holds under 'shards'.
    data_config: ``config.data`` (partition, dirichlet_alpha, data_proportion, hetero).
    seed: fixes the subset and the split.

  Returns:
    A :class:`Partition` whose indices point into ``labels``.

  Raises:
    DataError: for a request that cannot be met.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f'labels have dtype {labels.dtype} and shape {labels.shape}: '
                    'pass the 1-D integer labels of the training set')
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(f'labels span [{labels.min()}, {labels.max()}] but num_classes is '
                    f'{num_classes}: pass the dataset\'s class count')
  if num_clients < 1:
    raise DataError(f'num_clients is {num_clients}: use at least 1')
  proportion = float(data_config.data_proportion)
  if not 0 < proportion <= 1:
    raise DataError(f'data.data_proportion is {proportion}: use a value in (0, 1]')
  method = data_config.partition
  if method not in PARTITIONS:
    raise DataError(f'unknown data.partition {method!r}: use one of {list(PARTITIONS)}')

  rng = np.random.default_rng(seed)
  # The permutation also randomises the order when the proportion is 1 (spec 2.3 step 1).
  subset = rng.permutation(len(labels))[:int(proportion * len(labels) + _EPS)]
  if len(subset) < num_clients:
    raise DataError(f'{len(subset)} training samples are fewer than num_clients={num_clients}: '
                    'lower num_clients or raise data.data_proportion')
  hetero = parse_hetero(data_config.hetero, num_clients)
  if method == 'auto':
    method = 'iid' if noniid_ratio == 1.0 else 'shards'
  if num_clients == 1:
    method = 'iid'  # Spec 2.3 item 4: one client holds everything.

  if method == 'iid':
    sizes = _sizes(len(subset), num_clients, hetero)
    parts = np.split(subset[:sizes.sum()], np.cumsum(sizes)[:-1])
    description = 'iid'
  elif method == 'shards':
    if not 0 < noniid_ratio <= 1:
      raise DataError(f'noniid_ratio is {noniid_ratio}: use a value in (0, 1]')
    per_client = int(noniid_ratio * num_classes + _EPS)
    if per_client < 1:
      raise DataError(f'noniid_ratio {noniid_ratio} of {num_classes} classes is less than one '
                      'class per client: raise noniid_ratio')
    units = _shard_units(num_clients, hetero)
    parts = [subset[ix] for ix in _shards(labels[subset], units, per_client, rng)]
    description = f'shards ({per_client} per client)'
  else:
    alpha = float(data_config.dirichlet_alpha)
    if not alpha > 0:
      raise DataError(f'data.dirichlet_alpha is {alpha}: use a value > 0')
    sizes = _sizes(len(subset), num_clients, hetero)
    parts = [subset[ix] for ix in dirichlet(labels[subset], sizes, alpha, rng)]
    description = f'dirichlet (alpha={alpha})'

  multiplier = np.ones(num_clients, np.int32)
  if hetero is not None:
    multiplier[:hetero.num_rich] = hetero.batch_multiplier
    description += f', hetero {data_config.hetero}'
  if proportion < 1:
    description += f', data_proportion={proportion}'
  return Partition(list(parts), multiplier, description)


def make_partition_with_aux(labels: np.ndarray, num_classes: int, num_clients: int,
                            noniid_ratio: float, data_config, seed: int,
                            num_aux: int) -> Partition:
  """:func:`make_partition`'s split of the target set, each share followed by an auxiliary one.

  The training table holds the target's images, then the auxiliary set's, so
  auxiliary sample i has id ``len(labels) + i``; the auxiliary set is split
  IID (equal slices of a seeded permutation, the remainder dropped). Here
  ``data_proportion`` may be 0: the clients then hold auxiliary data only
  (TAResSFL's expert without target data, spec 6.4). With
  ``data_config.aux_balance`` a client's target share, when smaller than its
  auxiliary share, is repeated round(aux / target) times, so that its batches
  draw from both about equally often, as the reference's expert step of 128
  target and 128 auxiliary images does.
  """
  if num_aux < num_clients:
    raise DataError(f'the auxiliary set\'s {num_aux} training samples are fewer than '
                    f'num_clients={num_clients}: lower num_clients')
  if data_config.data_proportion == 0:
    target = Partition([np.zeros(0, np.int64)] * num_clients, np.ones(num_clients, np.int32),
                       'no target data')
  else:
    target = make_partition(labels, num_classes, num_clients, noniid_ratio, data_config, seed)
  aux = iid(num_aux, num_clients, np.random.default_rng([seed, 1]))
  shares = []
  for own, extra in zip(target.client_indices, aux):
    if data_config.aux_balance and 0 < len(own) < len(extra):
      own = np.tile(own, round(len(extra) / len(own)))
    shares.append(np.concatenate([own, len(labels) + extra]))
  balance = ', target repeated to balance' if data_config.aux_balance else ''
  return Partition(shares, target.batch_multiplier,
                   f'{target.method} + auxiliary iid ({num_aux} samples{balance})')
