"""Training: the data sets (`data`), and the trainer that fine-tunes pruned variants without
retracing them (`flex`, computing each layer type as `forward` says)."""

__all__: list[str] = []
