"""fluxlab: a lab for FLUX image models.

    import fluxlab
    pipe = fluxlab.load("flux2-klein-4b")          # models stay loaded in `pipe`
    result = pipe.generate(prompt="a lighthouse at dusk", seed=7)[0]
    result.image.save("lighthouse.png")

Importing this package loads no weights and imports no torch; `load` does that when called.
"""

__version__ = "0.1.0"


def load(model: str, device: str = "auto", dtype: str = "auto", transformer: str | None = None, notify=None):
    """Load a model and return a `fluxlab.pipeline.Pipeline`; see that module."""
    from .pipeline import load as _load

    return _load(model, device=device, dtype=dtype, transformer=transformer, notify=notify)


__all__ = ["__version__", "load"]
