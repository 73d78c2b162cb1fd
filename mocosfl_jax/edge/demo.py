"""``python -m mocosfl_jax.edge.demo --config=... --workdir=DIR --edge_clients=N``.

The demo exports the client model and starts the server, so it needs JAX,
which this package must not import (it runs on devices without it): the
command hands its arguments to the server-side module mocosfl_jax/edge_demo.py
and ends with its exit status.
"""
import os
import sys


def main() -> None:
  os.execv(sys.executable, [sys.executable, '-m', 'mocosfl_jax.edge_demo', *sys.argv[1:]])


if __name__ == '__main__':
  main()
