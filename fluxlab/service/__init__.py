"""One path for every front end: generate, grid, train and bench with typed events and cancel; outputs.

The CLI, the Python API, the server, the web page and the batch runner call these and nothing below them.
Importing this package imports no torch; each function imports what it needs when called.
"""

from __future__ import annotations


def generate(*args, **kwargs):
    """See service.generate.generate."""
    from .generate import generate as run

    return run(*args, **kwargs)


def prepare(*args, **kwargs):
    """See service.generate.prepare."""
    from .generate import prepare as run

    return run(*args, **kwargs)


def grid(*args, **kwargs):
    """See service.grid.grid."""
    from .grid import grid as run

    return run(*args, **kwargs)


def train(*args, **kwargs):
    """See service.train.train."""
    from .train import train as run

    return run(*args, **kwargs)
