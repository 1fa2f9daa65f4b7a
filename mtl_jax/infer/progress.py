"""Progress bars over loops that run in compiled pieces (SVI's Adam steps, NUTS's transitions).

Such a loop runs in :data:`PIECES` calls of one compiled program, each taking the state the
previous one left (the same steps as one call, so the same numbers); a bar, when shown,
advances between them, and shown or not the same program runs. (A bar advanced from inside
the program by a host callback would keep the program out of JAX's persistent compilation
cache, which does not store programs with callbacks.)
"""

from __future__ import annotations

import contextlib
import sys

import jax
import numpy as np

#: Pieces such a loop runs in.
PIECES = 20


def piece_length(total: int) -> int:
    """Steps per compiled call: ``ceil(total / PIECES)`` (at least 1)."""
    return max(-(-total // PIECES), 1)


@contextlib.contextmanager
def host_bar(total: int, description: str, enabled: bool):
    """Yields ``advance(steps)``: a ``tqdm`` bar over ``total`` steps on stderr, or a no-op when not ``enabled``."""
    if not enabled:
        yield lambda steps: None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=description, unit="step", file=sys.stderr) as bar:
        yield bar.update


def run_in_pieces(advance, state, total: int, description: str, shown: bool, keep_from: int = 0):
    """Steps ``0, ..., total - 1`` by ``state, outputs = advance(state, first, length)`` in pieces.

    ``advance`` is a compiled program that takes steps ``first, ..., first + length - 1``
    (those before ``total``) and returns the state after them and a pytree of per-step
    outputs with a leading ``[length]`` axis. A ``tqdm`` bar advances after each piece when
    ``shown``.

    Returns:
        The final state and the outputs of steps ``keep_from, ..., total - 1`` as host arrays
        (the earlier steps' are dropped as they come).
    """
    length = piece_length(total)
    kept = []
    with host_bar(total, description, shown) as bar:
        for first in range(0, total, length):
            state, outputs = advance(state, first, length)
            if first + length > keep_from:
                kept.append(jax.tree_util.tree_map(lambda leaf: np.asarray(leaf[max(keep_from - first, 0):]), outputs))
            bar(min(length, total - first))
    return state, jax.tree_util.tree_map(lambda *parts: np.concatenate(parts)[:total - keep_from], *kept)
