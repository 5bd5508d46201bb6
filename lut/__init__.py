"""Per-layer latency lookup tables: keys (`LayerSpec`), storage (`LatencyTable`), estimates."""
from lut.latency import LatencyEstimator, estimate_latency_ms, specs_of
from lut.spec import LayerSpec, LutError, UnsupportedLayerError
from lut.table import LatencyTable, Measurement, MeasurementFailure
from lut.tflite_ops import op_details, specs_of_tflite

__all__ = [
    "LatencyEstimator",
    "LayerSpec",
    "LatencyTable",
    "LutError",
    "Measurement",
    "MeasurementFailure",
    "UnsupportedLayerError",
    "estimate_latency_ms",
    "op_details",
    "specs_of",
    "specs_of_tflite",
]
