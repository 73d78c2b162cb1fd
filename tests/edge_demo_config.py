"""test_edge_demo's config, as a file for ``python -m mocosfl_jax.serve --config=``.

The tiny run with 6 clients, 3 a round, fixed views (so that edge clients give
the simulation's numbers) and one round of three steps with a sync after the
second.
"""
import tiny

OVERRIDES = {'num_clients': 6, 'client_sample_ratio': 0.5, 'steps_per_round': 3,
             'sync_every': 2, 'num_rounds': 1, 'moco.augmentation': 'none',
             'round_impl': 'loop', 'eval.every': 100}


def get_config():
  return tiny.config(**OVERRIDES)
