"""Tests for client partitions: iid, class shards, Dirichlet, subsets and hetero clients."""
import json

import ml_collections
import numpy as np
import pytest

from mocosfl_jax.data import partition
from mocosfl_jax.data.sources import DataError

# 10 balanced classes of 100 samples, shuffled so that order carries no label information.
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 100))


def _data(**overrides):
  fields = dict(partition='auto', dirichlet_alpha=0.5, data_proportion=1.0, hetero='')
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def _make(num_clients=5, noniid_ratio=1.0, seed=0, labels=LABELS, **data):
  return partition.make_partition(labels, 10, num_clients, noniid_ratio, _data(**data), seed)


def _classes(part, labels=LABELS):
  return [len(np.unique(labels[ix])) for ix in part.client_indices]


CASES = {
    'iid': dict(num_clients=7),
    'shards': dict(num_clients=20, noniid_ratio=0.2),
    'dirichlet': dict(num_clients=20, partition='dirichlet'),
    'subset': dict(num_clients=4, noniid_ratio=0.2, data_proportion=0.3),
    'hetero_iid': dict(num_clients=10, hetero='0.2_0.8|16|0.8_0.2'),
    'hetero_shards': dict(num_clients=10, noniid_ratio=0.2, hetero='0.2_0.8|16|0.8_0.2'),
    'hetero_dirichlet': dict(num_clients=10, partition='dirichlet', hetero='0.5_0.5|4|0.8_0.2'),
}


@pytest.mark.parametrize('case', CASES)
def test_every_sample_belongs_to_at_most_one_client(case):
  part = _make(**CASES[case])
  assigned = np.concatenate(part.client_indices)
  assert len(np.unique(assigned)) == len(assigned)
  assert assigned.min() >= 0 and assigned.max() < len(LABELS)
  assert all(len(ix) > 0 for ix in part.client_indices)
  assert part.num_clients == CASES[case]['num_clients'] == len(part.batch_multiplier)


@pytest.mark.parametrize('case', CASES)
def test_seed_fixes_the_partition(case):
  a, b, c = (_make(seed=seed, **CASES[case]) for seed in (3, 3, 4))
  assert all(np.array_equal(x, y) for x, y in zip(a.client_indices, b.client_indices))
  assert not all(np.array_equal(x, y) for x, y in zip(a.client_indices, c.client_indices))


def test_iid_equal_slices_drop_the_remainder():
  part = _make(num_clients=7)
  assert [len(ix) for ix in part.client_indices] == [1000 // 7] * 7
  assert min(_classes(part)) >= 8  # 142 random samples miss at most a couple of classes
  assert part.method == 'iid' and (part.batch_multiplier == 1).all()


@pytest.mark.parametrize('num_clients,ratio', [(5, 0.2), (2, 0.5), (10, 0.1), (1, 0.2)])
def test_shards_give_exactly_m_classes_when_clients_times_m_is_the_class_count(num_clients,
                                                                             ratio):
  part = _make(num_clients=num_clients, noniid_ratio=ratio)
  m = 10 if num_clients == 1 else round(ratio * 10)  # one client ignores noniid_ratio
  assert _classes(part) == [m] * num_clients
  # N * m == classes: shards are the classes, so no class is shared between clients.
  owners = [set(LABELS[ix]) for ix in part.client_indices]
  assert sum(len(o) for o in owners) == len(set().union(*owners)) == 10


@pytest.mark.parametrize('num_clients,ratio', [(20, 0.2), (50, 0.2), (10, 0.5), (100, 0.1)])
def test_shards_give_at_most_m_classes(num_clients, ratio):
  # Shard sizes divide the class size here; otherwise a shard straddles two classes.
  part = _make(num_clients=num_clients, noniid_ratio=ratio)
  m = round(ratio * 10)
  assert max(_classes(part)) <= m
  assert {len(ix) for ix in part.client_indices} == {1000 // (num_clients * m) * m}


def test_shards_can_give_a_client_two_shards_of_one_class():
  # The reference's behaviour (spec 2.3): with 50 clients x 2 shards of a
  # 10-class set, some client almost surely draws two shards of one class.
  assert min(_classes(_make(num_clients=50, noniid_ratio=0.2))) == 1


def test_noniid_ratio_rounding_does_not_lose_a_class():
  labels = np.repeat(np.arange(100), 10)
  part = partition.make_partition(labels, 100, 1000 // 29 // 10, 0.29, _data(), 0)
  # int(0.29 * 100) is 28 in floating point; the partition must use 29 classes.
  assert part.method == 'shards (29 per client)'


def test_legacy_class_shards_and_iid_still_work():
  shards = partition.class_shards(LABELS, 5, 2, np.random.default_rng(0))
  assert [len(np.unique(LABELS[ix])) for ix in shards] == [2] * 5
  slices = partition.iid(10, 3, np.random.default_rng(0))
  assert [len(s) for s in slices] == [3, 3, 3]
  table, counts = partition.padded(shards)
  assert table.shape == (5, 200) and list(counts) == [200] * 5


def _skews(part):
  """Total-variation distance of each client's label distribution from the global one."""
  shares = [np.bincount(LABELS[ix], minlength=10) / len(ix) for ix in part.client_indices]
  return np.array([0.5 * np.abs(share - 0.1).sum() for share in shares])


def test_dirichlet_skew_responds_to_alpha():
  skews = {alpha: _skews(_make(num_clients=10, partition='dirichlet', dirichlet_alpha=alpha))
           for alpha in (0.05, 1.0, 1000.0)}
  skews = {alpha: skew.mean() for alpha, skew in skews.items()}
  assert skews[0.05] > 0.6 > skews[1.0] > 0.2 > skews[1000.0]


def test_dirichlet_skew_does_not_depend_on_client_id():
  # Filling clients in id order would leave the last ids with the leftover classes.
  skew_by_id = np.mean([_skews(_make(num_clients=10, partition='dirichlet', seed=seed))
                        for seed in range(20)], axis=0)
  assert abs(skew_by_id[:5].mean() - skew_by_id[5:].mean()) < 0.05, skew_by_id


def test_dirichlet_keeps_client_sizes_and_uses_all_data_when_it_divides():
  part = _make(num_clients=10, partition='dirichlet', dirichlet_alpha=0.01)
  assert [len(ix) for ix in part.client_indices] == [100] * 10
  assert len(np.concatenate(part.client_indices)) == 1000


def test_data_proportion_keeps_a_random_subset_first():
  part = _make(num_clients=4, data_proportion=0.3)
  assigned = np.concatenate(part.client_indices)
  assert len(assigned) == 300
  other = _make(num_clients=4, data_proportion=0.3, seed=1)
  assert set(assigned) != set(np.concatenate(other.client_indices))
  # The subset is drawn before splitting: shards of the subset, not of the full set.
  shards = _make(num_clients=5, noniid_ratio=0.2, data_proportion=0.5)
  assert len(np.concatenate(shards.client_indices)) == 500


def test_single_client_ignores_noniid_ratio():
  for data in (dict(), dict(partition='shards'), dict(partition='dirichlet',
                                                      dirichlet_alpha=0.01)):
    # 0.05 of 10 classes would be an error for several clients.
    part = _make(num_clients=1, noniid_ratio=0.05, **data)
    assert len(part.client_indices[0]) == 1000 and _classes(part) == [10]
    assert part.method == 'iid'


def test_hetero_iid_rich_clients_hold_fraction_d_and_get_multiplier_c():
  part = _make(num_clients=10, hetero='0.2_0.8|16|0.8_0.2')
  sizes = [len(ix) for ix in part.client_indices]
  assert sizes == [400, 400] + [25] * 8  # 2 rich clients hold 80% of 1000 samples
  assert list(part.batch_multiplier) == [16, 16] + [1] * 8


def test_hetero_shards_hand_out_every_shard():
  part = _make(num_clients=10, noniid_ratio=0.2, hetero='0.2_0.8|16|0.8_0.2')
  sizes = np.array([len(ix) for ix in part.client_indices])
  # Rich clients draw 2 * 16 shards, poor ones 2: 80 shards of 12 samples.
  assert list(sizes) == [384, 384] + [24] * 8
  assert sizes.sum() > 1000 - 80  # at most the rounding remainder is left out
  assert max(_classes(part)[2:]) <= 2
  summary = part.summary(LABELS)
  assert summary['share_by_batch_multiplier']['16'] == pytest.approx(0.8)


def test_hetero_dirichlet_uses_hetero_sizes():
  part = _make(**CASES['hetero_dirichlet'])
  assert [len(ix) for ix in part.client_indices] == [160] * 5 + [40] * 5
  assert list(part.batch_multiplier) == [4] * 5 + [1] * 5


def test_summary_is_json_and_consistent():
  part = _make(num_clients=10, noniid_ratio=0.2, data_proportion=0.5)
  summary = json.loads(json.dumps(part.summary(LABELS)))
  assert summary['num_clients'] == 10 and summary['num_samples'] == 1000
  assert summary['assigned'] + summary['unassigned'] == 1000
  assert summary['assigned'] == sum(len(ix) for ix in part.client_indices)
  for client, ix in zip(summary['clients'], part.client_indices):
    counts = np.bincount(LABELS[ix], minlength=10)
    assert client['class_counts'] == {str(c): int(n) for c, n in enumerate(counts) if n}
    assert client['samples'] == len(ix) and client['batch_multiplier'] == 1
  assert summary['classes_per_client']['max'] == max(_classes(part))
  assert summary['samples_per_client']['mean'] == pytest.approx(summary['assigned'] / 10)


@pytest.mark.parametrize('kwargs,message', [
    (dict(num_clients=1001), 'fewer than num_clients'),
    (dict(num_clients=20, data_proportion=0.01), 'fewer than num_clients'),
    (dict(num_clients=0), 'num_clients'),
    (dict(num_clients=600, noniid_ratio=0.2), 'less than one image per shard'),
    (dict(noniid_ratio=0.05, partition='shards'), 'less than one class'),
    (dict(noniid_ratio=0.0, partition='shards'), 'noniid_ratio is 0.0'),
    (dict(partition='dirichlet', dirichlet_alpha=0.0), 'dirichlet_alpha'),
    (dict(partition='dirichlet', dirichlet_alpha=-1.0), 'dirichlet_alpha'),
    (dict(partition='pathological'), 'data.partition'),
    (dict(data_proportion=0.0), 'data_proportion'),
    (dict(data_proportion=1.5), 'data_proportion'),
    (dict(hetero='0.2|16|0.8'), 'malformed'),
    (dict(hetero='0.2_0.8|x|0.8_0.2'), 'malformed'),
    (dict(hetero='0.2_0.7|16|0.8_0.2'), 'must each be 1'),
    (dict(hetero='0.1_0.9|16|0.8_0.2'), '0 of 5 clients rich'),
    (dict(hetero='0.2_0.8|16|1.0_0.0'), 'D in'),
    (dict(hetero='0.2_0.8|0|0.8_0.2'), 'C must be'),
    (dict(num_clients=1, hetero='0.5_0.5|4|0.8_0.2'), 'clients rich'),
    (dict(num_clients=10, hetero='0.1_0.9|2|0.999_0.001'), 'cannot give each'),
    (dict(noniid_ratio=0.2, hetero='0.6_0.4|4|0.1_0.9'), 'at least 1x'),
])
def test_impossible_requests_raise_data_error(kwargs, message):
  with pytest.raises(DataError, match=message) as error:
    _make(**kwargs)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('labels,message', [
    (LABELS.reshape(10, 100), 'shape'),
    (LABELS.astype(np.float32), 'dtype'),
    (LABELS + 5, 'num_classes'),
])
def test_labels_must_be_integer_classes(labels, message):
  with pytest.raises(DataError, match=message):
    partition.make_partition(labels, 10, 2, 1.0, _data(), 0)
