"""A stored ChamNet predictor put to work: reopened from its folder, the LUT entries its space
needs, the search against one device's LUT and budget, and the final training of the winner.

The predictor folder (`adapter.chamnet build-predictor`) holds the trained candidates and the
identity they were trained under (base model, data, holdout, recipe, space). `load_predictor`
refits the Gaussian process on them (deterministic: the same rows and seed give the same
fit, in a second), so retargeting to another budget or LUT trains nothing. `space_models`
are the widest models of the space, one per resolution: every spec a candidate can have is
one of theirs with fewer channels, so `profiler.build_lut` plans the space's LUT from them.
`train_final` gives the winner the final recipe NetAdapt's result gets: it inherits the
base's weights and is fine-tuned for the long-term epochs.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapter.search.chamnet.build import build, candidate_of, inherit
from adapter.search.chamnet.candidates import open_store
from adapter.search.chamnet.predictor import AccuracyPredictor, FlopsRegression, Quality, quality
from adapter.search.chamnet.space import Candidate, SearchSpace, SpaceError, Stage
from adapter.search.chamnet.specs import candidate_specs
from adapter.search.run_store import RUN_FILE

__all__ = ["StoredPredictor", "candidate_latency_ms", "check_base", "load_predictor", "space_models", "train_final"]


@dataclasses.dataclass
class StoredPredictor:
    """A predictor folder reopened: its identity, its rows and the refitted predictor."""

    folder: Path
    identity: dict[str, Any]
    model_path: str
    space: SearchSpace
    predictor: AccuracyPredictor
    fitted: list[dict[str, Any]]
    held_out: list[dict[str, Any]]
    quality: Quality | None  # on the held-out candidates (None without any)
    flops_quality: Quality | None

    @property
    def classes(self) -> int:
        return int(self.identity["classes"])


def _space_of(identity: dict[str, Any]) -> SearchSpace:
    s = identity["space"]
    return SearchSpace(Candidate.parse(identity["base"]), int(s["step"]), grow=float(s["grow"]),
                       extra_blocks=int(s["extra_blocks"]), expansions=tuple(s["expansions"]),
                       resolutions=tuple(s["resolutions"]))


def load_predictor(folder: str | Path) -> StoredPredictor:
    """The predictor in `folder`, refitted; a one-line `SpaceError` when it is not one."""
    folder = Path(folder)
    if not (folder / RUN_FILE).is_file():
        raise SpaceError(f"{folder} holds no ChamNet predictor (no {RUN_FILE}); build one with "
                         "`python -m adapter.chamnet build-predictor`.")
    with open_store(folder) as store:
        state, rows = store.state(), store.rows("candidates")
    if not state or "identity" not in state or "model" not in state:
        raise SpaceError(f"{folder} is not a ChamNet predictor folder: its state names no identity and base model.")
    try:
        identity, space = state["identity"], _space_of(state["identity"])
    except (KeyError, TypeError, ValueError) as e:
        raise SpaceError(f"{folder}'s predictor state is malformed ({e}).") from e
    fitted = [r for r in rows if r["role"] != "held_out"]
    held_out = [r for r in rows if r["role"] == "held_out"]
    if len(fitted) < 3:
        raise SpaceError(f"{folder} holds {len(fitted)} trained candidates to fit on; the predictor needs at least 3. "
                         "Run `python -m adapter.chamnet build-predictor` with the same options to go on.")
    candidates = [Candidate.parse(r["candidate"]) for r in fitted]
    accuracies = [float(r["holdout_accuracy"]) for r in fitted]
    predictor = AccuracyPredictor(space, seed=int(identity["seed"])).fit(candidates, accuracies)
    tested = [Candidate.parse(r["candidate"]) for r in held_out]
    truth = [float(r["holdout_accuracy"]) for r in held_out]
    q = flops_q = None
    if len(held_out) >= 2:
        q = quality(predictor.predict(tested)[0], truth)
        flops_q = quality(FlopsRegression.fit(candidates, accuracies, int(identity["classes"])).predict(tested), truth)
    return StoredPredictor(folder, identity, str(state["model"]), space, predictor, fitted, held_out, q, flops_q)


def check_base(stored: StoredPredictor, model: Any, what: str) -> None:
    """Refuse a model that is not the base the predictor was built around."""
    found = candidate_of(model).text()
    if found != stored.identity["base"] or int(model.output_shape[-1]) != stored.classes:
        raise SpaceError(f"The predictor in {stored.folder} was built for the base {stored.identity['base']} "
                         f"({stored.classes} classes); {what} is {found} ({model.output_shape[-1]} classes). "
                         "Build a predictor for this model with `python -m adapter.chamnet build-predictor`.")


def space_models(space: SearchSpace, classes: int) -> list[Any]:
    """The widest, deepest candidate of the space at each resolution (the largest expansion in
    every expanding stage), and the base itself (its widths may lie off the grid), as Keras
    models: their specs on the channel grid cover every candidate's and the base's."""
    dims = dict(space.choices())
    widest = {name: max(values) for name, values in dims.items()}
    base = space.base
    stages = tuple(Stage(widest[f"stage{i}.channels"], widest[f"stage{i}.blocks"], stage.stride,
                         widest.get(f"stage{i}.expansion", stage.expansion)) for i, stage in enumerate(base.stages))
    return [build(base, classes)] + [
        build(Candidate(base.family, resolution, widest["stem"], stages, widest.get("last", 0)), classes)
        for resolution in dims["resolution"]]


def candidate_latency_ms(estimator: Any, classes: int) -> Callable[[Candidate], float]:
    """The LUT estimate of a candidate from its record (no Keras model built)."""
    def latency_ms(candidate: Candidate) -> float:
        return float(estimator.total_us(candidate_specs(candidate, classes))) / 1000

    return latency_ms


def train_final(candidate: Candidate, base_model: Any, data: Any, *, epochs: int, lr: float, batch_size: int,
                seed: int, verbose: bool = True) -> Any:
    """The winner's Keras model: the base's weights inherited, then `epochs` of fine-tuning
    (augmented, cosine learning rate: NetAdapt's long-term recipe)."""
    import keras

    from adapter.train import fit

    keras.utils.set_random_seed(seed)
    model = build(candidate, int(base_model.output_shape[-1]))
    inherit(model, candidate, base_model, candidate_of(base_model))
    if epochs:
        fit(model, data.train, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, augment=True, verbose=verbose)
    return model
