"""Multitask multiple-kernel learning (``"mtmkl"``), after Kandemir et al. (2014).

* :mod:`.kernels`: the per-modality kernels (RBF, linear, cosine) and their normalisation,
  fixed once on the training rows;
* :mod:`.solver`: the per-task LS-SVMs on weighted kernel sums (padded, vmapped Cholesky
  solves), the objective and its Danskin gradient, the regularisers, the optimisers of
  the kernel weights (projected Newton by default, exponentiated gradient), Platt scaling;
* :mod:`.model`: :class:`MTMKL` on the model protocol (per-person data, ``method="map"``).
"""

from mtl_jax.models.mtmkl.model import MTMKL, MTMKLParams

__all__ = ["MTMKL", "MTMKLParams"]
