import pytest

from asd_deploy.schedule import Schedule, denoising_timesteps, shift_sigma


def test_timesteps_match_self_forcing():
    assert denoising_timesteps(1) == [1000.0]
    assert denoising_timesteps(2) == pytest.approx([1000.0, 833.333333], abs=1e-4)
    assert denoising_timesteps(4) == pytest.approx([1000.0, 937.5, 833.333333, 625.0], abs=1e-4)
    # 3 steps: linspace(1000, 0, 4)[:-1] warped in closed form
    assert denoising_timesteps(3) == pytest.approx([1000.0, 1000 * shift_sigma(2 / 3), 1000 * shift_sigma(1 / 3)])


def test_warp_equals_table_lookup_for_integer_steps():
    # Self-Forcing: table[i] = 1000 * shift(1 - i/1000); warped t = table[1000 - t]
    table = [1000 * shift_sigma(1 - i / 1000) for i in range(1000)]
    for t in (1000, 750, 500, 250):
        assert denoising_timesteps(4)[[1000, 750, 500, 250].index(t)] == pytest.approx(table[1000 - t])


def test_ffe_steps_per_chunk():
    s = Schedule(steps=1, ffe=True)
    assert [s.steps_for_chunk(c) for c in range(4)] == [4, 1, 1, 1]
    assert s.sigmas_for_chunk(0)[-1] == 0.0 and len(s.sigmas_for_chunk(0)) == 5
    assert [Schedule(steps=2).steps_for_chunk(c) for c in range(3)] == [2, 2, 2]
    assert Schedule(steps=2, ffe=True, ffe_steps=3).timesteps_for_chunk(0) == denoising_timesteps(3)


@pytest.mark.parametrize("bad", [0, 5, 1.5, "2", True])
def test_bad_steps(bad):
    with pytest.raises(ValueError, match="steps must be an integer in 1..4"):
        Schedule(steps=bad)
