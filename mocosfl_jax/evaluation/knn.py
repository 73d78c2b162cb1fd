"""The weighted kNN monitor on frozen features (spec 5.1).

The reference (InstDisc-style, as in MoCo's monitor) classifies every test image
by its ``k`` most cosine-similar training images, each voting for its label with
weight ``exp(similarity / temperature)``. Queries are processed in fixed-size
chunks under ``lax.map`` so that the full (queries x bank) similarity matrix,
10,000 x 50,000 in the paper setting, never exists at once, and the function
compiles once per input shape.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _l2_normalize(x: jax.Array) -> jax.Array:
  # Same floor as torch.nn.functional.normalize, so an all-zero feature stays
  # zero instead of becoming NaN.
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, 1e-12)


@functools.partial(jax.jit, static_argnames=('num_classes', 'k', 'query_batch'))
def _predict(bank_features, bank_labels, query_features, temperature, *,
             num_classes, k, query_batch):
  """Predicted labels for queries; ``k`` and ``query_batch`` already clipped."""
  bank = _l2_normalize(bank_features.astype(jnp.float32))
  num_queries = query_features.shape[0]
  num_chunks = -(-num_queries // query_batch)
  # Zero padding rows are harmless: they are predicted and then cut off.
  queries = jnp.pad(query_features.astype(jnp.float32),
                    ((0, num_chunks * query_batch - num_queries), (0, 0)))
  queries = _l2_normalize(queries).reshape(num_chunks, query_batch, -1)

  def predict_chunk(chunk):
    similarity = chunk @ bank.T
    top_similarity, top_index = jax.lax.top_k(similarity, k)
    weights = jnp.exp(top_similarity / temperature)
    votes = jax.vmap(functools.partial(jax.ops.segment_sum, num_segments=num_classes))(
        weights, bank_labels[top_index])
    return jnp.argmax(votes, axis=-1)

  return jax.lax.map(predict_chunk, queries).reshape(-1)[:num_queries]


def knn_predict(bank_features, bank_labels, query_features, num_classes: int, *,
                k: int = 200, temperature: float = 0.1,
                query_batch: int = 1024) -> jax.Array:
  """Weighted-kNN label for every query.

  Args:
    bank_features: (N, D) features of the labelled bank (any scale; they are
      L2-normalised here, so similarity is cosine similarity).
    bank_labels: (N,) integer labels in [0, num_classes).
    query_features: (Q, D) features to classify.
    num_classes: number of classes.
    k: neighbours per query; clipped to N.
    temperature: votes are weighted by exp(similarity / temperature).
    query_batch: queries per chunk; bounds the memory of the similarity block
      at query_batch x N floats.

  Returns:
    (Q,) int32 predicted labels. Ties between classes go to the lowest class id.
  """
  bank_features = jnp.asarray(bank_features)
  query_features = jnp.asarray(query_features)
  return _predict(bank_features, jnp.asarray(bank_labels, jnp.int32), query_features,
                  jnp.float32(temperature), num_classes=num_classes,
                  k=min(k, bank_features.shape[0]),
                  query_batch=max(1, min(query_batch, query_features.shape[0])))


def knn_accuracy(bank_features, bank_labels, query_features, query_labels,
                 num_classes: int, k: int = 200, temperature: float = 0.1,
                 query_batch: int = 1024) -> float:
  """Top-1 accuracy of the weighted kNN monitor, in percent.

  The reference's defaults (k = 200, temperature = 0.1) are the defaults here;
  see ``knn_predict`` for the arguments.
  """
  predictions = knn_predict(bank_features, bank_labels, query_features, num_classes,
                            k=k, temperature=temperature, query_batch=query_batch)
  return 100.0 * float(np.mean(np.asarray(predictions) == np.asarray(query_labels)))
