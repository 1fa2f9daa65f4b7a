"""Hard-shared multitask nets (``"mtl-net"``) and the pooled net (``"pooled-net"``).

The network in :mod:`.network`, the model protocol in :mod:`.model`, the NumPyro program
in :mod:`.program`; MAP training is the generic :mod:`mtl_jax.infer.optimize`.
"""

from mtl_jax.models.mtl_net.model import MTLNet, PooledNet
from mtl_jax.models.mtl_net.network import NetParams

__all__ = ["MTLNet", "NetParams", "PooledNet"]
