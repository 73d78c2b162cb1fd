"""The tiny run that the end-to-end tests share: one config, so one set of programs.

Ten clients of the digits data, a 1/16-width ResNet-10 (model.depth 10: one
block a stage) with the small head and two steps a round: compiling is most of a
run's cost (a ResNet-18's run takes about half as long again), and the session's
persistent compilation cache (conftest.py) lets every run of this config after
the first, in any module or subprocess, load its programs instead. The other
end-to-end runs (test_hetero.py) keep its model, head, data, queue and kNN
settings, so that they load its initialisation, embedding and kNN programs.
"""
import ml_collections

from mocosfl_jax import config as config_lib

# Rounds 6 to 8 leave test_resume's SIGKILL a window of several seconds on a busy machine.
NUM_ROUNDS = 8
# Of every test model: the engine does not depend on the depth, and test_models
# checks each depth's network against the reference's shapes and sizes.
DEPTH = 10
PROBE_EPOCHS = 3
OVERRIDES = {
    'num_clients': 10, 'noniid_ratio': 0.2, 'batch_size': 2, 'cut_layer': 1,
    'num_rounds': NUM_ROUNDS, 'steps_per_round': 2, 'sync_every': 2,
    'data.source': 'digits', 'data.name': 'digits',
    'model.width': 0.0625, 'model.depth': DEPTH, 'moco.version': 'smallV2', 'moco.queue_size': 64,
    'eval.every': 3, 'eval.knn_k': 10, 'eval.final_probes': False,
    'eval.probe_epochs': PROBE_EPOCHS, 'checkpoint.every': 1, 'log_every': 1,
}


def config(**changes) -> ml_collections.ConfigDict:
  """The tiny config, with ``changes`` given as flattened names ('eval.every')."""
  c = config_lib.default_config()
  c.update_from_flattened_dict({**OVERRIDES, **changes})
  return c
