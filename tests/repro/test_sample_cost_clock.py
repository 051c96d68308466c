"""benchmarks/data_sample_cost.py's step clock: each step's own time, nested calls not counted twice,
and the library attributes it times put back afterwards."""

from __future__ import annotations

import time

from benchmarks import data_sample_cost
from benchmarks.data_sample_cost import StepClock, clocked, timed_points


def busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_nested_calls_get_their_own_time_only() -> None:
    clock = StepClock()
    inner = clock.wrap("inner", lambda: busy(0.05))

    def outer_body() -> None:
        busy(0.03)
        inner()
        inner()

    outer = clock.wrap("outer", outer_body)
    start = time.process_time()
    outer()
    total = time.process_time() - start
    assert clock.calls == {"inner": 2, "outer": 1}
    assert 0.095 <= clock.seconds["inner"] <= 0.13
    assert 0.025 <= clock.seconds["outer"] <= 0.05  # without the 0.1 s spent in inner
    assert abs(clock.seconds["inner"] + clock.seconds["outer"] - total) < 0.01


def test_clocked_restores_every_timed_attribute() -> None:
    before = [owner.__dict__[name] for owner, name, _ in timed_points()]
    clock = StepClock()
    with clocked(clock):
        during = [owner.__dict__[name] for owner, name, _ in timed_points()]
        from PIL import Image

        Image.new("RGB", (8, 8)).resize((4, 4))
    assert all(a is not b for a, b in zip(before, during, strict=True))
    assert [owner.__dict__[name] for owner, name, _ in timed_points()] == before
    assert clock.calls[data_sample_cost.RESIZE] == 1


def test_the_torch_port_of_pils_bicubic_shift_gives_pils_pixels() -> None:
    import numpy as np
    import torch
    from PIL import Image

    from benchmarks.data_sample_cost import translate_port

    array = np.random.default_rng(1).integers(0, 256, (31, 47, 3), dtype=np.uint8)
    image, fill = Image.fromarray(array), (124, 116, 104)
    for shift in (-50.7, -3.25, 0.4, 7.0, 37.3, 46.9):
        want = np.asarray(image.transform(image.size, Image.AFFINE, (1, 0, shift, 0, 1, 0),
                                          resample=Image.BICUBIC, fillcolor=fill))
        assert np.array_equal(translate_port(torch.from_numpy(array), shift, fill).numpy(), want), shift
    # control: a different kernel (bilinear) is not what the port computes
    other = np.asarray(image.transform(image.size, Image.AFFINE, (1, 0, 0.4, 0, 1, 0), resample=Image.BILINEAR,
                                       fillcolor=fill))
    assert not np.array_equal(translate_port(torch.from_numpy(array), 0.4, fill).numpy(), other)
