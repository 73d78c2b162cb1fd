"""Privacy: the model-inversion attack that scores a client model (spec 6.1).

``attack`` runs it on any client function or on a run's client model,
``decoders`` holds the attacker's decoder (res_normN4C64) and ``metrics`` the
per-image MSE, SSIM and PSNR. ``python -m mocosfl_jax.attack --workdir=DIR``
attacks a run's checkpoint; ``privacy.attack_at_end`` attacks the final model.
"""
