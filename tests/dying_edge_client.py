"""An edge client that dies right after its first local checkpoint, as a SIGKILL there would.

``python dying_edge_client.py ARGS``, ARGS those of ``python -m
mocosfl_jax.edge.client``. test_edge_demo's restart test needs the client gone
before it answers the round's next step: a kill sent by the test once the
checkpoint file appeared came too late on a fast machine (the client had
already finished the round, so nothing dropped and the test failed;
2026-12-04, AMD EPYC).
"""
import os
import sys

from mocosfl_jax.edge import remote

_save = remote.Runner.save


def _save_and_die(runner):
  _save(runner)
  sys.stderr.flush()
  os._exit(137)


remote.Runner.save = _save_and_die
remote.main()
