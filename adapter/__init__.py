"""Prune Keras CNNs to a device's latency budget, NetAdapt-style."""

__all__: list[str] = []
