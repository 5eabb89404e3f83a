r"""Inhibitory plasticity balances excitation (Vogels et al., Science 2011; lecture 16).

A rate neuron receives ``K`` input channels. Channel ``k`` carries a rate
:math:`x_k(t)` through a fixed excitatory weight :math:`w^E_k` (tuned: strongest at
the preferred channel) and through a plastic inhibitory weight :math:`w^I_k`, as a
pyramidal cell receives a feedforward signal both directly and through an interneuron:

.. math::
    y = \Big[\sum_k (w^E_k - w^I_k)\, x_k\Big]_+, \qquad
    \frac{d w^I_k}{dt} = \eta\, x_k\, (y - r_0), \qquad w^I_k \ge 0.

Inhibition grows while the output exceeds the target rate :math:`r_0` and shrinks
below it, so the output settles at (close to) :math:`r_0`. Each channel's weight stops
moving only when its own input no longer correlates with the output error; when the
channels fluctuate independently this needs :math:`w^I_k` to track :math:`w^E_k`
channel by channel: the inhibitory tuning comes to mirror the excitatory one
(detailed balance), reported as the Pearson correlation of the final :math:`w^I` with
:math:`w^E` across channels.

Linear analysis (all channels with mean ``m`` and variance ``v``): the fixed point is
:math:`w^I_k = w^E_k - d` with :math:`d = m r_0 / (v + K m^2)`, a common offset, and a
mean output :math:`r_0 K m^2 / (v + K m^2)`, slightly under :math:`r_0`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import style

__all__ = [
    "PlasticityData",
    "inhibitory_plasticity",
    "plot_inhibitory_plasticity",
    "write_plasticity_csv",
]


@dataclass
class PlasticityData:
    """Result of :func:`inhibitory_plasticity`.

    Attributes:
        time: end of each recording window ``(S,)`` (s).
        rate: output rate averaged over each window ``(S,)`` (Hz).
        w_inh: inhibitory weights at the end of each window ``(S, K)``.
        w_exc: the fixed excitatory weights ``(K,)``.
        w_inh_initial: inhibitory weights before learning ``(K,)``.
        target_rate: ``r0`` (Hz).
        final_rate: mean output over the last ``tail`` of the run (Hz).
        initial_rate: mean output over the first recording window (Hz).
        correlation: Pearson correlation of final ``w_inh`` with ``w_exc`` across channels.
        input_mean: mean input rate of every channel (Hz).
    """

    time: np.ndarray
    rate: np.ndarray
    w_inh: np.ndarray
    w_exc: np.ndarray
    w_inh_initial: np.ndarray
    target_rate: float
    final_rate: float
    initial_rate: float
    correlation: float
    input_mean: float

    @property
    def w_inh_final(self) -> np.ndarray:
        return self.w_inh[-1]


def _tuning(channels: int, low: float, high: float, width: float) -> np.ndarray:
    """Gaussian tuning over channel index, peak ``high`` at the middle channel."""
    k = np.arange(channels)
    return low + (high - low) * np.exp(-0.5 * ((k - (channels - 1) / 2) / width) ** 2)


def inhibitory_plasticity(
    *,
    channels: int = 8,
    duration: float = 20.0,
    dt: float = 1e-3,
    target_rate: float = 5.0,
    learning_rate: float = 0.01,
    input_mean: float = 10.0,
    modulation_sd: float = 5.0,
    modulation_tau: float = 0.05,
    noise_sd: float = 2.0,
    w_exc_range: tuple[float, float] = (0.2, 1.0),
    tuning_width: float = 1.5,
    w_inh_initial: float = 0.05,
    record_every: float = 0.1,
    tail: float = 0.25,
    seed: int = 0,
) -> PlasticityData:
    """Simulate the rate neuron under the inhibitory rule ``dw_I = eta x (y - r0) dt``.

    Each channel's rate is ``x_k = [m + s_k + noise]_+``: ``s_k`` an Ornstein-Uhlenbeck
    modulation of its own (sd ``modulation_sd``, time constant ``modulation_tau``),
    plus white noise of sd ``noise_sd`` per step. Euler steps of ``dt``.

    Args:
        channels: number of input channels ``K``.
        duration: simulated time (s).
        dt: time step (s).
        target_rate: ``r0`` (Hz).
        learning_rate: ``eta`` (1 / (Hz^2 s)).
        input_mean: ``m``, mean input rate (Hz).
        modulation_sd, modulation_tau, noise_sd: the input fluctuations (Hz, s, Hz).
        w_exc_range: (weakest, strongest) excitatory weight of the tuning curve.
        tuning_width: width of the excitatory tuning (channels).
        w_inh_initial: upper bound of the uniform random initial inhibitory weights.
        record_every: length of a recording window (s).
        tail: fraction of the run at the end over which ``final_rate`` is averaged.
        seed: seed of the inputs and initial weights; the run is deterministic given it.
    """
    for name, value in (
        ("duration", duration),
        ("dt", dt),
        ("learning_rate", learning_rate),
        ("record_every", record_every),
        ("modulation_tau", modulation_tau),
    ):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if not (isinstance(channels, int) and channels >= 2):
        raise ValueError(f"channels must be an int >= 2, got {channels!r}")
    if not 0 < tail <= 1:
        raise ValueError(f"tail must be in (0, 1], got {tail}")
    steps = int(round(duration / dt))
    window = max(1, int(round(record_every / dt)))
    if steps < window:
        raise ValueError(f"duration ({duration} s) is shorter than record_every ({record_every} s)")

    rng = np.random.default_rng(seed)
    w_exc = _tuning(channels, *w_exc_range, tuning_width)
    w_inh = rng.uniform(0.0, w_inh_initial, channels)
    w_inh0 = w_inh.copy()
    # Exact OU update over one step: s <- a s + sd sqrt(1 - a^2) xi.
    a = math.exp(-dt / modulation_tau)
    ou_kick = modulation_sd * math.sqrt(1.0 - a * a)
    modulation = modulation_sd * rng.standard_normal(channels)  # start in the stationary state

    windows = steps // window
    rates = np.empty(windows)
    w_history = np.empty((windows, channels))
    step_rates = np.empty(window)
    for w in range(windows):
        kicks = rng.standard_normal((window, 2, channels))
        for s in range(window):
            modulation = a * modulation + ou_kick * kicks[s, 0]
            x = np.maximum(input_mean + modulation + noise_sd * kicks[s, 1], 0.0)
            y = max(float((w_exc - w_inh) @ x), 0.0)
            w_inh = np.maximum(w_inh + (learning_rate * dt * (y - target_rate)) * x, 0.0)
            step_rates[s] = y
        rates[w] = step_rates.mean()
        w_history[w] = w_inh

    tail_windows = max(1, int(round(tail * windows)))
    final = w_history[-1]
    correlation = float(np.corrcoef(w_exc, final)[0, 1]) if np.std(final) > 0 else float("nan")
    return PlasticityData(
        time=(np.arange(windows) + 1) * window * dt,
        rate=rates,
        w_inh=w_history,
        w_exc=w_exc,
        w_inh_initial=w_inh0,
        target_rate=float(target_rate),
        final_rate=float(rates[-tail_windows:].mean()),
        initial_rate=float(rates[0]),
        correlation=correlation,
        input_mean=float(input_mean),
    )


@style.styled
def plot_inhibitory_plasticity(data: PlasticityData):
    """(a) output rate settling at r0, (b) inhibitory weights over time, (c) final tuning."""
    fig, axes = style.new_figure(3, width=7.2, height=2.4)
    ax_rate, ax_w, ax_tune = axes[0]

    ax_rate.plot(data.time, data.rate, color=style.COLORS["net"], label="output y")
    ax_rate.axhline(
        data.target_rate,
        color=style.COLORS["target"],
        linestyle="--",
        label=f"target $r_0$ = {data.target_rate:g} Hz",
    )
    ax_rate.set_yscale("log")
    ax_rate.set_xlabel("time (s)")
    ax_rate.set_ylabel("output rate (Hz)")
    ax_rate.set_title("output settles at the target")
    ax_rate.legend(loc="upper right")

    channels = data.w_exc.size
    colors = style.level_colors(channels)
    for k in range(channels):
        ax_w.plot(data.time, data.w_inh[:, k], color=colors[k], linewidth=1.0)
        ax_w.axhline(data.w_exc[k], color=colors[k], linewidth=0.6, linestyle=":")
    ax_w.set_xlabel("time (s)")
    ax_w.set_ylabel("weight (dimensionless)")
    ax_w.set_title("$w_I$ per channel (dotted: $w_E$)")

    k = np.arange(channels) + 1
    ax_tune.plot(
        k,
        data.w_exc,
        color=style.COLORS["excitation"],
        marker="o",
        markersize=3,
        label="excitatory $w_E$",
    )
    ax_tune.plot(
        k,
        data.w_inh_initial,
        color=style.COLORS["inhibition"],
        marker="o",
        markersize=3,
        linestyle=":",
        label="inhibitory $w_I$, before",
    )
    ax_tune.plot(
        k,
        data.w_inh_final,
        color=style.COLORS["inhibition"],
        marker="o",
        markersize=3,
        label="inhibitory $w_I$, after",
    )
    ax_tune.set_xlabel("input channel")
    ax_tune.set_ylabel("weight (dimensionless)")
    ax_tune.set_title(f"detailed balance, r = {data.correlation:.3f}")
    ax_tune.set_ylim(0, 1.35 * max(data.w_exc.max(), data.w_inh_final.max()))  # legend room
    ax_tune.legend(loc="upper left")
    for ax, letter in zip(axes[0], "abc"):
        style.panel_label(ax, letter)
    return fig


def write_plasticity_csv(data: PlasticityData, path: Path) -> Path:
    """Tidy CSV: ``quantity, channel, time_s, value``; summary rows carry no time."""

    def rows():
        for t, r in zip(data.time, data.rate):
            yield ("output_rate_hz", "", t, r)
        for s, t in enumerate(data.time):
            for k in range(data.w_exc.size):
                yield ("w_inh", k, t, data.w_inh[s, k])
        for k in range(data.w_exc.size):
            yield ("w_exc", k, "", data.w_exc[k])
            yield ("w_inh_initial", k, "", data.w_inh_initial[k])
        yield ("target_rate_hz", "", "", data.target_rate)
        yield ("final_rate_hz", "", "", data.final_rate)
        yield ("correlation_w_exc_w_inh", "", "", data.correlation)

    return style.write_csv(path, ("quantity", "channel", "time_s", "value"), rows())
