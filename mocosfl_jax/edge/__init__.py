"""The edge client: a device-side MocoSFL client that needs neither JAX nor TensorFlow.

It imports only NumPy, Pillow and ai_edge_litert, so it installs on a small
device such as a Raspberry Pi 4B (64-bit OS). Its modules:

- ``model``: ``ClientModel``, an exported client model (a LiteRT ``.tflite``
  and its JSON sidecar, written by ``python -m mocosfl_jax.export``) with its
  ``infer``, ``ema_infer``, ``train``, ``ema_update`` and weight signatures;
- ``data``: the client's own images from a folder or an ``npz`` archive;
- ``augment``: the MoCo v2 / v1 pair views in NumPy, from the simulator's
  distributions;
- ``schedule``: the engine's client learning rate;
- ``client``: ``EdgeClient``, which walks the data, makes the views, runs the
  forward passes in the engine's order, applies the server's gradient and
  keeps a local checkpoint.
- ``protocol``: the protobuf messages between the server and its edge
  clients (numpy and protobuf only);
- ``remote``: the edge-client process, ``python -m mocosfl_jax.edge.client``,
  which serves a server's requests over gRPC (adds grpcio);
- ``demo``: ``python -m mocosfl_jax.edge.demo``, which hands its command line
  to the server-side mocosfl_jax/edge_demo.py (it imports JAX): that writes
  the clients' files and starts a server and its edge clients on 127.0.0.1.

Nothing here imports the rest of ``mocosfl_jax``, and the package imports no
submodule itself: ``from mocosfl_jax.edge.client import EdgeClient``.
"""
