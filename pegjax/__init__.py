"""pegjax: large-batch contrastive training of text-embedding retrieval models in JAX/Flax.

Run as a command (``python -m pegjax.main``, ``pegjax.evaluate``, ``pegjax.mine``,
``pegjax.export``), the process restarts here once, before the command's module imports jax, with
the faster allocator (`pegjax.distributed.restart_with_tuned_malloc`); imported as a library,
nothing happens.
"""

from pegjax.distributed import restart_if_command as _restart_if_command

_restart_if_command(__name__)
