"""Search methods: each decides which smaller model meets the budget, over the shared machinery.

`netadapt` prunes filters iteratively (NetAdapt), `width_multiplier` scales the whole network
(the baseline a user would compare against); both estimate through `adapter.latency`, and the
CLIs (`adapter.adapt`, `adapter.baseline`) wire them to a session (`adapter.session`), the
final check and the report.
"""

__all__: list[str] = []
