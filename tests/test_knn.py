"""Tests for the weighted kNN monitor against a plain numpy twin."""
import numpy as np
import pytest

from mocosfl_jax.evaluation import knn


def numpy_knn_predict(bank, bank_labels, queries, num_classes, k, temperature):
  """The reference's knn_predict, written out in float64 numpy."""
  bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  similarity = queries.astype(np.float64) @ bank.astype(np.float64).T
  top = np.argsort(-similarity, axis=1)[:, :k]
  weights = np.exp(np.take_along_axis(similarity, top, axis=1) / temperature)
  scores = np.zeros((len(queries), num_classes))
  np.add.at(scores, (np.arange(len(queries))[:, None], bank_labels[top]), weights)
  return scores.argmax(axis=1)


def _random_problem(seed, num_bank=700, num_queries=300, dim=16, num_classes=10):
  rng = np.random.default_rng(seed)
  # Noisy clusters: neighbourhoods are mixed, so the votes' weights decide many
  # predictions and a wrong weighting shows up as disagreement.
  centers = rng.normal(size=(num_classes, dim))
  bank_labels = rng.integers(num_classes, size=num_bank)
  query_labels = rng.integers(num_classes, size=num_queries)
  bank = centers[bank_labels] + 2.0 * rng.normal(size=(num_bank, dim))
  queries = centers[query_labels] + 2.0 * rng.normal(size=(num_queries, dim))
  return (bank.astype(np.float32), bank_labels, queries.astype(np.float32),
          query_labels, num_classes)


@pytest.mark.parametrize('seed,k,temperature', [(0, 50, 0.1), (1, 200, 0.1), (2, 20, 0.5)])
def test_predictions_match_numpy_reference(seed, k, temperature):
  bank, bank_labels, queries, _, num_classes = _random_problem(seed)
  # A chunk size that does not divide the query count exercises the padding.
  got = knn.knn_predict(bank, bank_labels, queries, num_classes, k=k,
                        temperature=temperature, query_batch=64)
  want = numpy_knn_predict(bank, bank_labels, queries, num_classes, k, temperature)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_accuracy_matches_numpy_reference():
  bank, bank_labels, queries, query_labels, num_classes = _random_problem(3)
  want = numpy_knn_predict(bank, bank_labels, queries, num_classes, 200, 0.1)
  expected = 100.0 * np.mean(want == query_labels)
  assert 10.0 < expected < 100.0
  assert knn.knn_accuracy(bank, bank_labels, queries, query_labels,
                          num_classes) == pytest.approx(expected)


def test_chunk_size_does_not_change_predictions():
  bank, bank_labels, queries, _, num_classes = _random_problem(4)
  small = knn.knn_predict(bank, bank_labels, queries, num_classes, query_batch=7)
  whole = knn.knn_predict(bank, bank_labels, queries, num_classes, query_batch=4096)
  np.testing.assert_array_equal(np.asarray(small), np.asarray(whole))


def test_k_larger_than_bank_is_clipped():
  bank, bank_labels, queries, _, num_classes = _random_problem(5, num_bank=60)
  got = knn.knn_predict(bank, bank_labels, queries, num_classes, k=200, temperature=0.05)
  want = numpy_knn_predict(bank, bank_labels, queries, num_classes, 60, 0.05)
  np.testing.assert_array_equal(np.asarray(got), want)


def _unit(degrees):
  radians = np.deg2rad(degrees)
  return np.stack([np.cos(radians), np.sin(radians)], axis=-1).astype(np.float32)


# Query at 0 degrees. Class 0: one bank point at 0 degrees (similarity 1).
# Class 1: two points at +-60 degrees (similarity 0.5). Class 2: five points at
# 180 degrees (similarity -1), outside the top 3. Bank norms vary to check that
# features are normalised inside.
_BANK = _unit(np.array([0, 60, -60, 180, 180, 180, 180, 180])) * np.array(
    [[3.0], [0.5], [7.0], [1.0], [2.0], [0.1], [4.0], [9.0]], np.float32)
_BANK_LABELS = np.array([0, 1, 1, 2, 2, 2, 2, 2])
_QUERY = 5.0 * _unit(np.array([0]))


@pytest.mark.parametrize('k,temperature,expected', [
    (3, 0.1, 0),   # exp(10) beats 2 exp(5): the close neighbour wins.
    (3, 10.0, 1),  # Near-uniform weights: two votes beat one.
    (8, 1e3, 2),   # All neighbours, near-uniform weights: five votes win.
    (50, 1e3, 2),  # k beyond the bank size means the whole bank.
])
def test_known_answer_by_construction(k, temperature, expected):
  got = knn.knn_predict(_BANK, _BANK_LABELS, _QUERY, 3, k=k, temperature=temperature)
  np.testing.assert_array_equal(np.asarray(got), [expected])


def test_accuracy_is_percent_of_correct_queries():
  queries = np.concatenate([_QUERY, _unit(np.array([180]))])
  # Predictions are [0, 2]; only the first label is right.
  accuracy = knn.knn_accuracy(_BANK, _BANK_LABELS, queries, np.array([0, 1]), 3, k=3)
  assert accuracy == 50.0
