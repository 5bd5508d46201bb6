"""ChamNet's search space: candidates as data, models built from them, weights inherited."""
from __future__ import annotations

import numpy as np
import pytest

from lut.quiet_tf import import_tensorflow_quietly

import_tensorflow_quietly()

from adapter.search.chamnet.build import build, candidate_of, inherit  # noqa: E402
from adapter.search.chamnet.space import Candidate, SearchSpace, SpaceError, Stage  # noqa: E402
from lut.keras_specs import specs_of_keras  # noqa: E402
from lut.models import build_model  # noqa: E402

pytestmark = pytest.mark.timeout(300)

V2_BASE = "v2 r32 c16 | 8x1 16x2e6s2 16x3e6s2 32x4e6s2 48x3e6 80x3e6s2 160x1e6 | l1280"
V1_BASE = "v1 r32 c16 | 32x1 64x2s2 128x2s2 256x6s2 512x2s2"


def _random_weights(model, seed: int = 0):
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, 0.2, w.shape).astype("float32") if w.ndim > 1 else
                       np.abs(rng.normal(1, 0.1, w.shape)).astype("float32") for w in model.get_weights()])
    return model


@pytest.fixture(scope="module", params=["mobilenet_v2", "mobilenet_v1"])
def base(request):
    return _random_weights(build_model(request.param, alpha=0.5, resolution=32, classes=10))


def _outputs(model, resolution: int = 32):
    x = np.random.default_rng(1).normal(0, 1, (4, resolution, resolution, 3)).astype("float32")
    return model(x, training=False).numpy()


def test_a_candidate_has_a_stable_text_that_reads_back():
    candidate = Candidate.parse(V2_BASE)
    assert candidate.text() == V2_BASE and candidate.blocks == 17
    assert candidate.stages[1] == Stage(16, 2, stride=2, expansion=6)
    with pytest.raises(SpaceError, match=r"Not a candidate's text: expected e\.g\. .*Received: 'v3 r32'"):
        Candidate.parse("v3 r32")
    with pytest.raises(SpaceError, match="positive integer widths"):
        Candidate("mobilenet_v2", 32, 0, (Stage(8, 1),), 1280)


def test_a_keras_applications_mobilenet_reads_as_its_candidate(base):
    expected = V2_BASE if base.get_layer(index=1).name == "Conv1" else V1_BASE
    assert candidate_of(base).text() == expected


def test_the_base_as_a_candidate_rebuilds_the_same_model_with_the_same_function(base):
    candidate = candidate_of(base)
    model = build(candidate, classes=10)
    def layout(m):  # every layer's kind and keras.applications name (Keras numbers the unnamed pooling)
        return [(type(layer).__name__, layer.name.rstrip("_0123456789") if "pooling" in layer.name else layer.name)
                for layer in m.layers[1:]]

    assert layout(model) == layout(base)
    inherit(model, candidate, base)
    np.testing.assert_allclose(_outputs(model), _outputs(base), atol=1e-6)
    assert [s.key for s in specs_of_keras(model)] == [s.key for s in specs_of_keras(base)]


def test_a_narrower_candidate_keeps_the_largest_norm_filters_of_the_base(base):
    candidate = candidate_of(base)
    narrow = Candidate(candidate.family, 40, 8, candidate.stages, candidate.last)
    model = build(narrow, classes=10)
    inherit(model, narrow, base)
    stem = "Conv1" if candidate.family == "mobilenet_v2" else "conv1"
    kernel = base.get_layer(stem).get_weights()[0]
    keep = np.sort(np.argsort(-np.abs(kernel).sum(axis=(0, 1, 2)))[:8])
    np.testing.assert_array_equal(model.get_layer(stem).get_weights()[0], kernel[..., keep])
    assert model.input_shape[1:] == (40, 40, 3)  # the same weights at another resolution


def test_an_extra_block_starts_as_the_identity_so_the_deeper_candidate_computes_the_same():
    base = _random_weights(build_model("mobilenet_v2", alpha=0.5, resolution=32, classes=10))
    candidate = candidate_of(base)
    stages = list(candidate.stages)
    stages[4] = Stage(stages[4].channels, stages[4].blocks + 1, stages[4].stride, stages[4].expansion)
    deeper = Candidate(candidate.family, 32, candidate.stem, tuple(stages), candidate.last)
    model = build(deeper, classes=10)
    inherit(model, deeper, base)
    assert len(model.layers) > len(base.layers)
    np.testing.assert_allclose(_outputs(model), _outputs(base), atol=1e-5)


def test_the_space_samples_distinct_candidates_spread_by_sobol_and_encodes_them_back():
    space = SearchSpace.around(Candidate.parse(V2_BASE), step=8, resolutions=(32, 40, 48), extra_blocks=1)
    names = [name for name, _ in space.choices()]
    assert names[:4] == ["resolution", "stem", "stage0.channels", "stage0.blocks"] and "stage0.expansion" not in names
    assert dict(space.choices())["stage1.expansion"] == [1, 4, 5, 6]
    assert dict(space.choices())["stage6.channels"] == list(range(8, 241, 8))  # up to 1.5 × the base's
    sample = space.sample(20, seed=3)
    assert len({c.text() for c in sample}) == 20 and sample == space.sample(20, seed=3)
    assert all(space.contains(c) for c in sample)
    assert all(space.decode(space.encode(c)) == c for c in sample)
    assert len({c.resolution for c in sample}) == 3
    assert not space.contains(Candidate.parse(V2_BASE.replace("c16", "c12")))
    with pytest.raises(SpaceError, match="has 23 coordinates"):
        space.decode([0.5])


def test_a_sample_kept_to_a_region_holds_only_candidates_of_it():
    space = SearchSpace.around(Candidate.parse(V2_BASE), step=8)
    small = lambda c: c.stages[-1].channels <= 64  # noqa: E731 (a region: the widest stage at most 64 of up to 240)
    kept = space.sample(12, seed=3, keep=small)
    assert len({c.text() for c in kept}) == 12 and all(small(c) for c in kept)
    assert not all(small(c) for c in space.sample(12, seed=3))  # the whole space's sample is not
    with pytest.raises(SpaceError, match="fewer than 5 distinct candidates in the region"):
        space.sample(5, seed=3, keep=lambda c: False)


def test_every_sampled_candidate_builds_a_model_the_lut_reads():
    base = build_model("mobilenet_v2", alpha=0.5, resolution=32, classes=10)
    space = SearchSpace.around(candidate_of(base), step=8, resolutions=(32, 48), extra_blocks=1)
    for candidate in space.sample(4, seed=0):
        model = build(candidate, classes=10)
        inherit(model, candidate, base)
        specs = specs_of_keras(model)
        assert len(specs) >= 3 * candidate.blocks - 1 and model.input_shape[1] == candidate.resolution
        read = candidate_of(model)
        assert (read.blocks, read.resolution, read.stem, read.last) == (candidate.blocks, candidate.resolution,
                                                                         candidate.stem, candidate.last)
        # a stride-1 stage as wide as the one before reads back merged into it; any other reads back whole
        merged = any(s.stride == 1 and s.channels == p.channels for p, s in zip(candidate.stages, candidate.stages[1:]))
        assert merged or read == candidate


@pytest.mark.parametrize("family", ["mobilenet_v2", "mobilenet_v1"])
def test_a_candidates_specs_from_its_record_are_those_of_its_built_model(family):
    from adapter.search.chamnet.specs import candidate_specs

    base = candidate_of(build_model(family, alpha=0.5, resolution=32, classes=10))
    # 40 and 56 px make odd feature maps (5, 7 px) before a stride-2 block: the padding rules differ there
    space = SearchSpace.around(base, step=8, resolutions=(32, 40, 56), extra_blocks=1)
    for candidate in [base, *space.sample(8, seed=1)]:
        assert candidate_specs(candidate, 10) == specs_of_keras(build(candidate, classes=10)), candidate.text()
