"""Progress bars for loops that run inside one compiled program (SVI steps, NUTS transitions).

The loop stays a ``lax.scan`` in a single program; each step calls :func:`tick` (a
``jax.debug.callback``) and the host advances whichever bar :func:`host_bar` has open.
The callback names no bar, so a cached program compiled under one bar serves the next
call's bar too.
"""

from __future__ import annotations

import contextlib
import sys

import jax

_open_bars: list = []


@contextlib.contextmanager
def host_bar(total: int, description: str, enabled: bool):
    """A ``tqdm`` bar of ``total`` steps that :func:`tick` advances while the block runs (nothing when not ``enabled``)."""
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=description, unit="step", file=sys.stderr)
    _open_bars.append(bar)
    try:
        yield
    finally:
        _open_bars.remove(bar)
        bar.close()


def _advance(_) -> None:
    if _open_bars:
        _open_bars[-1].update(1)


def tick(after) -> None:
    """Advance the open bar by one step once ``after`` (a traced value of the step) is computed."""
    jax.debug.callback(_advance, after)
