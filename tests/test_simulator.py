"""The synthetic line: reproducible, honest masks, the configured defect rate."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ingest.simulator import DEFECT_TYPES, MASK_THRESHOLD, PRODUCTS, LineSimulator, SimulatedPart


@pytest.fixture(scope="module")
def sim() -> LineSimulator:
    return LineSimulator(seed=3)


def test_same_seed_and_index_give_identical_parts(sim):
    other = LineSimulator(seed=3)
    for index in (0, 1, 17, 250):
        a, b = sim.part(index), other.part(index)
        assert np.array_equal(a.image, b.image)
        assert np.array_equal(a.mask, b.mask)
        assert (a.product, a.defect_type) == (b.product, b.defect_type)
    # random access: the order of rendering does not matter
    assert np.array_equal(sim.part(5).image, [p for p in itertools.islice(iter(other), 6)][-1].image)


def test_different_seeds_and_indices_differ(sim):
    assert not np.array_equal(sim.part(0).image, sim.part(2).image)  # both "disc"
    assert not np.array_equal(sim.part(0).image, LineSimulator(seed=4).part(0).image)


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("defect_type", DEFECT_TYPES)
def test_every_product_and_defect_renders(sim, product, defect_type):
    for index in range(5):
        part = sim.part(index, product=product, defect_type=defect_type)
        assert isinstance(part, SimulatedPart)
        assert part.image.shape == (256, 256, 3) and part.image.dtype == np.uint8
        assert part.mask.shape == (256, 256) and part.mask.dtype == np.uint8
        assert set(np.unique(part.mask)) <= {0, 255}
        assert (part.product, part.defect_type) == (product, defect_type)
        assert part.mask.any()


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("defect_type", DEFECT_TYPES)
def test_mask_marks_where_the_defect_changed_the_image(sim, product, defect_type):
    for index in range(8):
        good = sim.part(index, product=product, defect_type=None)
        bad = sim.part(index, product=product, defect_type=defect_type)
        assert not good.mask.any()
        diff = np.abs(bad.image.astype(int) - good.image.astype(int)).max(axis=2)
        inside = bad.mask > 0
        # outside the mask, nothing changed by more than the threshold (+1 for rounding)
        assert diff[~inside].max(initial=0) <= MASK_THRESHOLD + 1
        # inside it, (nearly) every pixel changed; saturation at 0/255 may hide a few
        assert (diff[inside] > 0).mean() > 0.9
        assert diff[inside].max() > 2 * MASK_THRESHOLD


def test_random_part_equals_the_forced_render_of_its_defect(sim):
    for index in range(40):
        part = sim.part(index)
        forced = sim.part(index, defect_type=part.defect_type)
        assert np.array_equal(part.image, forced.image)
        assert np.array_equal(part.mask, forced.mask)


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5])
def test_defect_rate_is_honoured(rate):
    sim = LineSimulator(defect_rate=rate, seed=11, size=64)
    parts = [sim.part(i) for i in range(500)]
    defective = [p for p in parts if p.defect_type is not None]
    assert abs(len(defective) / len(parts) - rate) < 0.06
    assert all(p.mask.any() for p in defective)
    assert not any(p.mask.any() for p in parts if p.defect_type is None)
    if rate >= 0.2:  # every configured type shows up
        assert {p.defect_type for p in defective} == set(DEFECT_TYPES)


def test_products_cycle_and_defect_types_are_configurable():
    sim = LineSimulator(products=("tile",), defect_rate=1.0, defect_types=("dent",), size=96)
    parts = list(itertools.islice(iter(sim), 6))
    assert {p.product for p in parts} == {"tile"}
    assert {p.defect_type for p in parts} == {"dent"}
    assert all(p.image.shape == (96, 96, 3) for p in parts)
    assert [LineSimulator().part(i).product for i in range(4)] == ["disc", "tile", "disc", "tile"]


def test_normal_references_are_good_varied_and_not_the_stream(sim):
    refs = sim.normal_references("disc", 4)
    assert len(refs) == 4
    assert all(r.shape == (256, 256, 3) and r.dtype == np.uint8 for r in refs)
    assert not np.array_equal(refs[0], refs[1])
    stream = [sim.part(i, product="disc", defect_type=None).image for i in range(8)]
    assert not any(np.array_equal(r, s) for r in refs for s in stream)
    assert np.array_equal(refs[2], sim.normal_references("disc", 3)[2])
    # normal variation stays modest: references are close to each other
    assert np.abs(refs[0].astype(int) - refs[1].astype(int)).mean() < 30


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown product"):
        LineSimulator(products=("bottle",))
    with pytest.raises(ValueError, match="unknown defect type"):
        LineSimulator().part(0, defect_type="crack")
    with pytest.raises(ValueError, match="defect_rate"):
        LineSimulator(defect_rate=1.5)
