"""fluxlab: a lab for FLUX image models.

    import fluxlab
    pipe = fluxlab.load("flux2-klein-4b")          # models stay loaded in `pipe`
    result = pipe.generate(prompt="a lighthouse at dusk", seed=7)[0]
    pipe.save(result, "lighthouse.png")            # with its settings; result.image is a PIL image

    client = fluxlab.Client("http://127.0.0.1:7860", token="...")   # a `fluxlab serve` server

Importing this package loads no weights and imports no torch; `load` does that when called.
"""

__version__ = "0.1.0"


def load(model, **options):
    """Load a model (catalog name, local diffusers directory or hub repo id) and return a
    `fluxlab.service.api.Pipeline` that keeps it in memory. Options: device, dtype, transformer, loras, quantize,
    memory, budget, notify, ...; see `fluxlab.service.api.load`."""
    from .service.api import load as _load

    return _load(model, **options)


def __getattr__(name: str):
    if name == "Client":  # imported on first use: httpx is not needed to generate locally
        from .client import Client

        return Client
    raise AttributeError(f"module 'fluxlab' has no attribute {name!r}")


__all__ = ["Client", "__version__", "load"]
