"""Per-layer latency lookup tables: keys (`LayerSpec`), storage (`LatencyTable`), estimates."""
from lut.latency import LatencyEstimator, estimate_latency_ms, specs_of
from lut.spec import LayerSpec, LutError, UnsupportedLayerError
from lut.table import LatencyTable, Measurement, MeasurementFailure

__all__ = [
    "LatencyEstimator",
    "LayerSpec",
    "LatencyTable",
    "LutError",
    "Measurement",
    "MeasurementFailure",
    "UnsupportedLayerError",
    "estimate_latency_ms",
    "specs_of",
]
