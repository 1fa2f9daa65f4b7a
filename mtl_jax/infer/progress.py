"""Progress bars over loops that run in compiled pieces (SVI's Adam steps, NUTS's transitions).

A loop shown with a bar runs in :data:`PIECES` calls of one compiled program, each taking
the state the previous one left, and the bar advances between them; without a bar it runs
in one call. The pieces do exactly the steps of the single call, so a bar changes no
number. (A bar advanced from inside the program by a host callback would keep the program
out of JAX's persistent compilation cache, which does not store programs with callbacks.)
"""

from __future__ import annotations

import contextlib
import sys

#: Pieces a loop shown with a bar is split into.
PIECES = 20


def piece_length(total: int, shown: bool, most: int | None = None) -> int:
    """Steps per compiled call: all ``total`` at once, or ``ceil(total / PIECES)`` when ``shown``;
    at most ``most`` (e.g. to bound what one call returns)."""
    length = -(-total // PIECES) if shown else total
    return max(min(length, most or length), 1)


@contextlib.contextmanager
def host_bar(total: int, description: str, enabled: bool):
    """Yields ``advance(steps)``: a ``tqdm`` bar over ``total`` steps on stderr, or a no-op when not ``enabled``."""
    if not enabled:
        yield lambda steps: None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=description, unit="step", file=sys.stderr) as bar:
        yield bar.update
