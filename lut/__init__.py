"""Per-layer latency lookup tables: keys (`LayerSpec`), storage (`LatencyTable`), estimates."""
from lut.spec import LayerSpec, LutError, UnsupportedLayerError
from lut.table import LatencyTable, Measurement, MeasurementFailure

__all__ = [
    "LayerSpec",
    "LatencyTable",
    "LutError",
    "Measurement",
    "MeasurementFailure",
    "UnsupportedLayerError",
]
