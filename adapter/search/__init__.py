"""Search methods: each decides which smaller model meets the budget, over the shared machinery.

`netadapt` prunes filters iteratively (NetAdapt), `width_multiplier` scales the whole network
(the baseline a user would compare against), `chamnet` searches an architecture's
hyper-parameters with an accuracy predictor and a genetic algorithm (ChamNet); all estimate
through `adapter.latency` or the LUT, keep their runs in `run_store`, and the
CLIs (`adapter.adapt`, `adapter.baseline`, `adapter.chamnet`) wire them to a session (`adapter.session`), the
final check and the report.
"""

__all__: list[str] = []
