"""test_edge_demo's processes that die right after a checkpoint, as a SIGKILL there would.

    python die_after_checkpoint.py client ARGS         # python -m mocosfl_jax.edge.client ARGS
    python die_after_checkpoint.py server ROUND ARGS   # python -m mocosfl_jax.serve ARGS

The client dies once its first local checkpoint is written, the server once
its checkpoint of round ROUND is on disk; both with status 137. A kill sent by
the test when the file appeared came too late on a fast machine: the client
had already finished the round, so nothing dropped (2026-12-04, AMD EPYC), and
with no edge client in its next rounds the server could finish them first.
"""
import os
import runpy
import sys

from mocosfl_jax import checkpoint
from mocosfl_jax.edge import remote

STATUS = 137


def _exit(status):
  """Leaves at once, as a kill would, and as the client's own command does (client.py)."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


def client(argv):
  save = remote.Runner.save

  def save_and_die(runner):
    save(runner)
    _exit(STATUS)

  remote.Runner.save = save_and_die
  _exit(remote.main(argv))


def server(round_, argv):
  save = checkpoint.Checkpoints.save

  def save_and_die(checkpoints, state, saved_round, config, extra):
    save(checkpoints, state, saved_round, config, extra)
    if saved_round == round_:
      checkpoints.wait()
      _exit(STATUS)

  checkpoint.Checkpoints.save = save_and_die
  sys.argv = [sys.argv[0], *argv]
  runpy.run_module('mocosfl_jax.serve', run_name='__main__', alter_sys=True)


if __name__ == '__main__':
  if sys.argv[1] == 'client':
    client(sys.argv[2:])
  else:
    server(int(sys.argv[2]), sys.argv[3:])
