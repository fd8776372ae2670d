"""Small helpers shared by tests and benchmarks (no dependency on the rest of the package)."""
from .memory import measure_peak

__all__ = ["measure_peak"]
