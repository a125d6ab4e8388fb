"""The flow-matching schedule: timesteps for any step count, First-Frame Enhancement, updates.

Owns: the shifted sigma table (shift 5.0, 1000 training timesteps), the warped denoising
timesteps for 1..4 steps, the per-chunk step plan with FFE, and the per-step update
(flow -> x0 -> re-noise). Does not own: drawing noise (the loop owns its seeded generator).

Convention (as in Self-Forcing): `x_t = (1 - sigma) x0 + sigma eps`, the network predicts
`v = eps - x0`, and the network's timestep is `ModelConfig.num_train_timesteps * sigma` (1000 for
Wan; the loop and training read it from the config). The sigmas themselves come from Self-Forcing's
1000-entry shifted table (`TABLE_SIZE`), a constant of the schedule, not of the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_STEPS = 4
TABLE_SIZE = 1000  # entries of Self-Forcing's shifted sigma table; sigma = table timestep / TABLE_SIZE


def shift_sigma(sigma: float, shift: float = 5.0) -> float:
    return shift * sigma / (1 + (shift - 1) * sigma)


def denoising_timesteps(steps: int, shift: float = 5.0, num_train_timesteps: int = TABLE_SIZE) -> list[float]:
    """`linspace(1000, 0, steps+1)[:-1]` warped onto the shifted table.

    Self-Forcing warps an integer step list t through `table[1000 - t]`, where table[i] is the
    shifted timestep of sigma = 1 - i/1000; that is `1000 * shift_sigma(t / 1000)`, computed
    here in closed form so 3 steps (non-integer t) are exact too. 4 steps -> [1000, 937.5,
    833.33, 625.0].
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be an integer in 1..{MAX_STEPS}; got {steps!r}")
    n = num_train_timesteps
    raw = [n * (1 - i / steps) for i in range(steps)]
    return [n * shift_sigma(t / n, shift) for t in raw]


@dataclass(frozen=True)
class Schedule:
    """How many denoising steps each chunk gets. With FFE the first chunk gets `ffe_steps`."""
    steps: int = 1
    ffe: bool = False
    ffe_steps: int = 4
    shift: float = 5.0
    stochastic = True  # the sampler re-noises each x0 prediction with fresh noise (not a field)

    def __post_init__(self):
        denoising_timesteps(self.steps)  # validates
        if self.ffe:
            denoising_timesteps(self.ffe_steps)

    def steps_for_chunk(self, chunk: int) -> int:
        return self.ffe_steps if (self.ffe and chunk == 0) else self.steps

    def timesteps_for_chunk(self, chunk: int) -> list[float]:
        return denoising_timesteps(self.steps_for_chunk(chunk), self.shift)

    def sigmas_for_chunk(self, chunk: int) -> list[float]:
        """Sigmas of the chunk's steps followed by 0 (the clean end)."""
        return denoising_sigmas(self.steps_for_chunk(chunk), self.shift) + [0.0]

    def describe(self) -> str:
        return f"{self.steps}-step" + (f" + FFE ({self.ffe_steps} steps on chunk 0)" if self.ffe else "")

    def to_dict(self) -> dict:
        return {"steps": self.steps, "ffe": self.ffe, "ffe_steps": self.ffe_steps, "shift": self.shift,
                "timesteps": {str(k): denoising_timesteps(k, self.shift)
                              for k in sorted({self.steps, self.ffe_steps if self.ffe else self.steps})}}


@dataclass(frozen=True)
class EulerSchedule:
    """The teacher's sampler: `steps` Euler steps of the flow ODE per chunk, from sigma 1 to 0 on
    the shifted table (sigma_i = shift_sigma(1 - i / steps))."""
    steps: int = 20
    shift: float = 5.0
    stochastic = False

    def __post_init__(self):
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer; got {self.steps!r}")

    def sigmas_for_chunk(self, chunk: int) -> list[float]:
        return [shift_sigma(1 - i / self.steps, self.shift) for i in range(self.steps)] + [0.0]

    def describe(self) -> str:
        return f"{self.steps}-step Euler"


def denoising_sigmas(steps: int, shift: float = 5.0) -> list[float]:
    """The sigmas of `steps` denoising steps (no trailing 0), as the C++ runtime computes them."""
    return [t / TABLE_SIZE for t in denoising_timesteps(steps, shift)]


def flow_to_x0(x_t: torch.Tensor, flow: torch.Tensor, sigma: float) -> torch.Tensor:
    return x_t - sigma * flow


def renoise(x0: torch.Tensor, eps: torch.Tensor, sigma: float) -> torch.Tensor:
    return (1 - sigma) * x0 + sigma * eps
