"""test_multihost's config, as a file for ``python -m mocosfl_jax.main --config=``.

test_sharding's: the tiny run with 16 clients, 8 a round (a drawn pool) and a
queue per client, so that the pool's draws and the per-client rows cross the
processes.
"""
import tiny


def get_config():
  return tiny.config(**{'num_clients': 16, 'client_sample_ratio': 0.5,
                        'moco.feature_sharing': False, 'num_rounds': 2})
