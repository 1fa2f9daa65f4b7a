"""Single-task baselines for multitask learning: one model per task, fitted independently.

:mod:`mtl_jax.models.baselines.solvers` holds the pure-JAX solvers (L2- and L1-penalised
logistic regression, least-squares SVM) for one task, written once and ``jax.vmap``-ed
over tasks gathered into padded blocks (``pad_by_task`` / ``unpad``).
"""
