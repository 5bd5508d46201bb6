"""The pruning engine: which channels go together (`graph`), the rule per Keras layer type
(`rules`), and the surgery that removes filters from a model (`surgery`)."""

__all__: list[str] = []
