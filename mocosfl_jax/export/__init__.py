"""The client model -> LiteRT (.tflite) with inference and training signatures.

``python -m mocosfl_jax.export --workdir=DIR`` exports a run's client
(``__main__``); :func:`export_client` exports given weights. The JAX side
(``client``) needs only the core install; converting (``litert``) needs the
``export`` extra, imported when a model is converted. README "Edge client:
export" describes the signatures and the sidecar.
"""
from mocosfl_jax.export.exporter import export_client

__all__ = ['export_client']
