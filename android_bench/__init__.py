"""What runs on the phone: the batch runner script pushed next to `benchmark_model`."""

__all__: list[str] = []
