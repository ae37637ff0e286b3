"""SpecServe: SLO-aware adaptive speculative decoding."""

__version__ = "0.1.0"
