"""Location of the shared data directory.

The data sets used by ``mtl_jax`` are not shipped with the package. They live in a
shared directory that is found, in order of preference, from

1. the environment variable ``MTL_JAX_DATA_DIR``;
2. ``../shared/data`` relative to the current working directory;
3. ``../shared/data`` relative to the root of the repository holding this source file.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "MTL_JAX_DATA_DIR"
"""Name of the environment variable that overrides the default data directory."""

_DEFAULT_RELATIVE = Path("..") / "shared" / "data"


def data_dir() -> Path:
    """Returns the shared data directory as an absolute path.

    Returns:
        The resolved directory, taken from ``$MTL_JAX_DATA_DIR`` when that variable is
        set (and non-empty), otherwise the first existing default location
        ``<cwd>/../shared/data`` or ``<repository root>/../shared/data``.

    Raises:
        FileNotFoundError: If ``$MTL_JAX_DATA_DIR`` is set but is not a directory, or if
            it is unset and no default location exists.
    """
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        path = Path(override).expanduser().resolve()
        if not path.is_dir():
            raise FileNotFoundError(
                f"{DATA_DIR_ENV} is set to {override!r}, which is not a directory."
            )
        return path

    repo_root = Path(__file__).resolve().parents[2]
    candidates = (Path.cwd() / _DEFAULT_RELATIVE, repo_root / _DEFAULT_RELATIVE)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"No shared data directory found (tried {tried}); "
        f"set the environment variable {DATA_DIR_ENV} to its location."
    )
