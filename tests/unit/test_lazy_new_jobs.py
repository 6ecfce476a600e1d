"""LazyNewJobs behaves as the list of the jobs it builds, however it is read, and builds each
request once, in order, no further than what was read."""

from __future__ import annotations

import pytest

from conveyor.backends.base import LazyNewJobs, NewJob


def _lazy(n: int) -> tuple[LazyNewJobs, list[int]]:
    built: list[int] = []

    def build(request: int, index: int) -> NewJob:
        assert request == index
        built.append(index)
        return NewJob(task=f"t{index}", queue="q")

    return LazyNewJobs(list(range(n)), build), built


@pytest.mark.parametrize(
    "index",
    [
        slice(None, -3),
        slice(2, 5),
        slice(-4, None),
        slice(None, None, 2),
        slice(None, None, -1),
        slice(8, 2, -2),
        slice(3, 3),
        slice(20, 30),
    ],
)
def test_slices_read_as_on_a_list(index: slice) -> None:
    expected = [NewJob(task=f"t{i}", queue="q") for i in range(10)]
    for first_read in (None, 7):  # fresh, or partly built already
        lazy, _ = _lazy(10)
        if first_read is not None:
            assert lazy[first_read] == expected[first_read]
        assert lazy[index] == expected[index]


def test_items_are_built_once_in_order_and_only_as_far_as_read() -> None:
    lazy, built = _lazy(10)
    assert len(lazy) == 10 and built == []
    assert lazy[2].task == "t2" and built == [0, 1, 2]
    assert [j.task for j in lazy[:4]] == ["t0", "t1", "t2", "t3"] and built == [0, 1, 2, 3]
    assert lazy[-1].task == "t9" and built == list(range(10))
    assert [j.task for j in lazy] == [f"t{i}" for i in range(10)] and built == list(range(10))
    with pytest.raises(IndexError):
        lazy[10]
