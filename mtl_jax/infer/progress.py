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
