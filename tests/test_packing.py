"""Packing's first-fit decreasing, and row geometry on real length distributions."""

import numpy as np
import pytest

from pegjax.data import packing


def first_fit_decreasing(lengths, rows, length, slots):
    """The plain algorithm, one text at a time: each text, longest first (ties in input order), in
    the first row with room for its tokens and a free slot -> (row, offset, segment), or None."""
    free, used = [length] * rows, [0] * rows
    placed = [None] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r in range(rows) if free[r] >= lengths[i] and used[r] < slots), None)
        if r is None:
            return None
        placed[i] = (r, length - free[r], used[r] + 1)
        free[r] -= lengths[i]
        used[r] += 1
    return placed


def test_assign_places_every_text_where_first_fit_decreasing_does():
    rng = np.random.default_rng(0)
    outcomes = {True: 0, False: 0}
    for case in range(400):
        count, length, slots = int(rng.integers(0, 50)), int(rng.integers(4, 40)), int(rng.integers(1, 6))
        lengths = rng.integers(0 if case % 3 == 0 else 1, length + 1, count)  # empty texts too
        rows = int(rng.integers(1, count + 2))
        want = first_fit_decreasing(lengths.tolist(), rows, length, slots)
        outcomes[want is not None] += 1
        if want is None:
            with pytest.raises(packing.DoesNotFit):
                packing.assign(lengths, rows, length, slots)
        else:
            got = packing.assign(lengths, rows, length, slots)
            assert list(zip(*(a.tolist() for a in got))) == want
    assert min(outcomes.values()) > 100  # both outcomes well covered
