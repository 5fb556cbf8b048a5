"""mova-rt: a faithful, fast inference runtime for MOVA (OpenMOSS), video with synchronized audio."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import mova_rt` (and `mova-rt info`) stay cheap.
    if name == "MovaPipeline":
        from .pipeline import MovaPipeline

        return MovaPipeline
    raise AttributeError(name)
