r"""Gating modes (Costa et al. 2017, Figure 1, bottom panels).

(a) A current-based noisy leaky integrate-and-fire (LIF) neuron whose inhibitory input
current subtracts from the excitatory one (section 2.1),

.. math::
    \tau_m \dot u = -u + R I_\mathrm{exc} - R I_\mathrm{inh} + \text{noise},

spike and reset to rest when ``u`` reaches the threshold :math:`\theta`, then a
refractory period :math:`t_\mathrm{ref}` during which ``u`` is held at rest. With
:math:`t_\mathrm{ref} = 5` ms no neuron can fire faster than 200 Hz, the cap of the
paper's figure. Its simulated rate is overlaid with the paper's firing-rate
approximation (section 2.1, after Gerstner and Kistler 2002),

.. math::
    r = \Big(t_\mathrm{ref} + \tau_m \ln \frac{R(I_\mathrm{exc} - I_\mathrm{inh})}
        {R(I_\mathrm{exc} - I_\mathrm{inh}) - \theta}\Big)^{-1}
    \quad\text{for } R(I_\mathrm{exc} - I_\mathrm{inh}) > \theta, \text{ else } 0,

the noise-free rate of the same neuron; the paper writes it without
:math:`t_\mathrm{ref}` and caps it at 200 Hz, which adding the refractory period does
smoothly. Near threshold the noisy neuron fires where the approximation says zero: the
noise smooths the corner.

(b) A sigmoid with subtractive gating, :math:`\sigma(x) - g` (the subLSTM's
``sigma(c) - o``), and (c) with multiplicative gating, :math:`\sigma(x)\,g` (the
LSTM's ``tanh(c) * o`` with a sigmoid in place of tanh): inhibition shifts the curve
down in (a) and (b) and scales it in (c).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.lines import Line2D

from . import style

__all__ = [
    "GatingData",
    "LIFParameters",
    "gating_curves",
    "lif_rate_approximation",
    "multiplicative_gating",
    "plot_gating",
    "simulate_lif_rate",
    "subtractive_gating",
    "write_gating_csv",
]


@dataclass(frozen=True)
class LIFParameters:
    """A current-based LIF neuron; potentials relative to rest (0 mV).

    Units: ms, mV, MOhm, nA (MOhm x nA = mV).
    """

    tau_m: float = 20.0  # membrane time constant (ms)
    resistance: float = 100.0  # membrane resistance R (MOhm)
    threshold: float = 20.0  # theta, above rest (mV); threshold current theta / R = 0.2 nA
    reset: float = 0.0  # potential after a spike (mV): rest, as in the paper's formula
    refractory: float = 5.0  # t_ref (ms): caps the rate below 1 / t_ref = 200 Hz
    noise: float = 0.02  # std of the Gaussian current noise (nA); free membrane std R * noise
    dt: float = 0.1  # Euler step (ms)

    def __post_init__(self) -> None:
        for name in ("tau_m", "resistance", "threshold", "refractory", "dt"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"LIFParameters.{name} must be > 0, got {value}")
        if self.noise < 0:
            raise ValueError(f"LIFParameters.noise must be >= 0, got {self.noise}")
        if self.reset >= self.threshold:
            raise ValueError(
                f"LIFParameters.reset ({self.reset}) must lie below threshold ({self.threshold})"
            )
        if self.dt > 0.1 * self.tau_m:
            raise ValueError(
                f"LIFParameters.dt ({self.dt} ms) must be at most tau_m / 10 "
                f"({self.tau_m / 10} ms) for the Euler scheme to be accurate"
            )

    @property
    def max_rate(self) -> float:
        """The refractory cap ``1 / t_ref`` in Hz."""
        return 1000.0 / self.refractory


def simulate_lif_rate(
    excitatory: np.ndarray | Sequence[float],
    inhibitory: np.ndarray | Sequence[float] | float = 0.0,
    *,
    params: LIFParameters | None = None,
    duration: float = 1000.0,
    trials: int = 8,
    seed: int = 0,
) -> np.ndarray:
    r"""Firing rate of the noisy LIF neuron, simulated (Euler-Maruyama), in Hz.

    Every combination of excitatory and inhibitory current and every trial is one
    independent neuron; all are simulated together as one array.

    Per step, outside the refractory period,
    :math:`u \leftarrow u + \frac{dt}{\tau_m}(-u + R(I_\mathrm{exc} - I_\mathrm{inh}))
    + R\,\sigma_I \sqrt{2\,dt/\tau_m}\,\xi` with :math:`\xi \sim N(0, 1)`, so the free
    membrane fluctuates with standard deviation :math:`R\sigma_I` around its mean. A
    spike is counted when ``u >= threshold``; ``u`` is then reset and held for
    ``refractory`` ms.

    Args:
        excitatory: excitatory currents ``(N,)`` in nA.
        inhibitory: inhibitory currents ``(L,)`` in nA (or a scalar).
        params: the neuron; :class:`LIFParameters` defaults if ``None``.
        duration: simulated time per trial (ms).
        trials: independent trials per input pair.
        seed: seed of the noise.

    Returns:
        ``rates`` ``(L, N, trials)`` in Hz (``L = 1`` for a scalar ``inhibitory``).
    """
    p = params or LIFParameters()
    exc = np.atleast_1d(np.asarray(excitatory, dtype=float))
    inh = np.atleast_1d(np.asarray(inhibitory, dtype=float))
    if exc.ndim != 1 or inh.ndim != 1:
        raise ValueError("excitatory and inhibitory must be scalars or 1-D sequences")
    if not duration > 0:
        raise ValueError(f"duration must be > 0 ms, got {duration}")
    if not (isinstance(trials, int) and trials >= 1):
        raise ValueError(f"trials must be a positive int, got {trials!r}")
    rng = np.random.default_rng(seed)
    steps = int(round(duration / p.dt))
    refractory_steps = int(round(p.refractory / p.dt))
    drive = p.resistance * (exc[None, :, None] - inh[:, None, None])  # (L, N, 1) mV
    shape = (inh.size, exc.size, trials)
    decay = p.dt / p.tau_m
    noise_scale = p.resistance * p.noise * math.sqrt(2.0 * decay)

    u = np.full(shape, p.reset)
    refractory_left = np.zeros(shape, dtype=np.int64)
    spikes = np.zeros(shape, dtype=np.int64)
    for _ in range(steps):
        free = refractory_left == 0
        u_next = u + decay * (drive - u) + noise_scale * rng.standard_normal(shape)
        u = np.where(free, u_next, u)
        fired = u >= p.threshold
        spikes += fired
        u[fired] = p.reset
        refractory_left = np.where(fired, refractory_steps, np.maximum(refractory_left - 1, 0))
    return spikes * (1000.0 / (steps * p.dt))


def lif_rate_approximation(
    excitatory: np.ndarray | Sequence[float] | float,
    inhibitory: np.ndarray | Sequence[float] | float = 0.0,
    *,
    params: LIFParameters | None = None,
) -> np.ndarray:
    r"""The paper's firing-rate approximation of the LIF neuron (section 2.1), in Hz.

    :math:`r = (t_\mathrm{ref} + \tau_m \ln\frac{\mu - u_\mathrm{reset}}{\mu - \theta})^{-1}`
    with :math:`\mu = R(I_\mathrm{exc} - I_\mathrm{inh})` above threshold and 0 below;
    with ``reset = 0`` and ``refractory = 0`` this is the paper's expression exactly.
    Noise is ignored. Broadcasts like NumPy: ``(L, 1)`` inhibition against ``(N,)``
    excitation gives ``(L, N)``.
    """
    p = params or LIFParameters()
    mu = p.resistance * (np.asarray(excitatory, dtype=float) - np.asarray(inhibitory, dtype=float))
    above = mu > p.threshold
    safe_mu = np.where(above, mu, p.threshold + 1.0)  # keeps the log finite where unused
    time_to_threshold = p.tau_m * np.log((safe_mu - p.reset) / (safe_mu - p.threshold))
    return np.where(above, 1000.0 / (p.refractory + time_to_threshold), 0.0)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def subtractive_gating(x: np.ndarray, gates: Sequence[float]) -> np.ndarray:
    """``sigma(x) - g`` for each gate level ``g``: ``(G, len(x))``."""
    return _sigmoid(np.asarray(x, dtype=float))[None, :] - np.asarray(gates, dtype=float)[:, None]


def multiplicative_gating(x: np.ndarray, gates: Sequence[float]) -> np.ndarray:
    """``sigma(x) * g`` for each gate level ``g``: ``(G, len(x))``."""
    return _sigmoid(np.asarray(x, dtype=float))[None, :] * np.asarray(gates, dtype=float)[:, None]


@dataclass
class GatingData:
    """Everything Figure 1's bottom panels show.

    Attributes:
        excitatory: LIF excitatory currents ``(N,)`` (nA).
        inhibitory: LIF inhibitory currents ``(L,)`` (nA), one curve each.
        rate: simulated rate, trial mean ``(L, N)`` (Hz).
        rate_sd: its standard deviation over trials ``(L, N)`` (Hz).
        rate_approximation: the paper's approximation ``(L, N)`` (Hz).
        sigmoid_input: input of the sigmoid panels ``(M,)``.
        subtractive_gates: gate levels of panel (b) ``(G,)``.
        subtractive: ``sigma(x) - g`` ``(G, M)``.
        multiplicative_gates: gate levels of panel (c) ``(G,)``.
        multiplicative: ``sigma(x) * g`` ``(G, M)``.
        params: the LIF neuron simulated.
    """

    excitatory: np.ndarray
    inhibitory: np.ndarray
    rate: np.ndarray
    rate_sd: np.ndarray
    rate_approximation: np.ndarray
    sigmoid_input: np.ndarray
    subtractive_gates: np.ndarray
    subtractive: np.ndarray
    multiplicative_gates: np.ndarray
    multiplicative: np.ndarray
    params: LIFParameters = field(default_factory=LIFParameters)


def gating_curves(
    *,
    excitatory: Sequence[float] | None = None,
    inhibitory: Sequence[float] = (0.0, 0.5, 1.0, 1.5),
    params: LIFParameters | None = None,
    duration: float = 1000.0,
    trials: int = 8,
    sigmoid_input: Sequence[float] | None = None,
    subtractive_gates: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
    multiplicative_gates: Sequence[float] = (1.0, 0.75, 0.5, 0.25),
    seed: int = 0,
) -> GatingData:
    """Compute the three gating panels.

    Args:
        excitatory: LIF excitatory currents (nA); default 0 to 3 nA in steps of 0.05 nA.
        inhibitory: LIF inhibitory currents (nA), one curve each.
        params: the LIF neuron.
        duration: simulated ms per trial.
        trials: trials per point.
        sigmoid_input: input of panels (b), (c); default -6 to 6 in 121 steps.
        subtractive_gates: levels ``g`` of ``sigma(x) - g`` (0 = open).
        multiplicative_gates: levels ``g`` of ``sigma(x) * g`` (1 = open); the k-th
            level of each list is drawn in the same colour.
        seed: seed of the LIF noise.
    """
    p = params or LIFParameters()
    exc = np.linspace(0.0, 3.0, 61) if excitatory is None else np.asarray(excitatory, float)
    inh = np.asarray(inhibitory, dtype=float)
    rates = simulate_lif_rate(exc, inh, params=p, duration=duration, trials=trials, seed=seed)
    x = np.linspace(-6.0, 6.0, 121) if sigmoid_input is None else np.asarray(sigmoid_input, float)
    sub = np.asarray(subtractive_gates, dtype=float)
    mul = np.asarray(multiplicative_gates, dtype=float)
    return GatingData(
        excitatory=exc,
        inhibitory=inh,
        rate=rates.mean(axis=-1),
        rate_sd=rates.std(axis=-1),
        rate_approximation=lif_rate_approximation(exc[None, :], inh[:, None], params=p),
        sigmoid_input=x,
        subtractive_gates=sub,
        subtractive=subtractive_gating(x, sub),
        multiplicative_gates=mul,
        multiplicative=multiplicative_gating(x, mul),
        params=p,
    )


@style.styled
def plot_gating(data: GatingData):
    """Three panels: (a) LIF rate vs excitation, (b) subtractive, (c) multiplicative gating."""
    fig, axes = style.new_figure(3, width=7.2, height=2.5)
    ax_lif, ax_sub, ax_mul = axes[0]

    colors = style.level_colors(len(data.inhibitory))
    for k, inh in enumerate(data.inhibitory):
        ax_lif.fill_between(
            data.excitatory,
            data.rate[k] - data.rate_sd[k],
            data.rate[k] + data.rate_sd[k],
            color=colors[k],
            alpha=0.2,
            linewidth=0,
        )
        ax_lif.plot(
            data.excitatory,
            data.rate[k],
            color=colors[k],
            marker="o",
            markersize=2,
            label=f"$I_{{inh}}$ = {inh:g} nA",
        )
        ax_lif.plot(
            data.excitatory,
            data.rate_approximation[k],
            color=colors[k],
            linestyle="--",
            linewidth=1.0,
        )
    ax_lif.axhline(data.params.max_rate, color=style.COLORS["net"], linewidth=0.6, linestyle=":")
    ax_lif.set_xlabel("excitatory input $I_{exc}$ (nA)")
    ax_lif.set_ylabel("output rate (Hz)")
    ax_lif.set_title("noisy LIF, subtractive inhibition")
    ax_lif.set_ylim(0, 1.3 * data.params.max_rate)
    levels_legend = ax_lif.legend(loc="upper left", ncols=2, columnspacing=0.8)
    ax_lif.add_artist(levels_legend)
    kinds = [
        Line2D([], [], color=style.COLORS["simulation"], marker="o", markersize=2),
        Line2D([], [], color=style.COLORS["simulation"], linestyle="--", linewidth=1.0),
    ]
    ax_lif.legend(kinds, ["simulation (mean ± sd)", "approximation (§2.1)"], loc="lower right")

    levels = max(len(data.subtractive_gates), len(data.multiplicative_gates))
    colors = style.level_colors(levels)
    for k, g in enumerate(data.subtractive_gates):
        ax_sub.plot(data.sigmoid_input, data.subtractive[k], color=colors[k], label=f"g = {g:g}")
    ax_sub.set_xlabel("excitatory input x (a.u.)")
    ax_sub.set_ylabel(r"output $\sigma(x) - g$ (a.u.)")
    ax_sub.set_title("subtractive gating")
    ax_sub.axhline(0.0, color=style.COLORS["net"], linewidth=0.5)
    ax_sub.legend(loc="upper left")
    for k, g in enumerate(data.multiplicative_gates):
        ax_mul.plot(data.sigmoid_input, data.multiplicative[k], color=colors[k], label=f"g = {g:g}")
    ax_mul.set_xlabel("excitatory input x (a.u.)")
    ax_mul.set_ylabel(r"output $\sigma(x)\,g$ (a.u.)")
    ax_mul.set_title("multiplicative gating")
    ax_mul.legend(loc="upper left")
    for ax, letter in zip(axes[0], "abc"):
        style.panel_label(ax, letter)
    return fig


def write_gating_csv(data: GatingData, path: Path) -> Path:
    """Tidy CSV: ``panel, level, input, output, output_sd, approximation``.

    ``lif`` rows: level = inhibitory current (nA), input = excitatory current (nA),
    output = simulated rate (Hz, trial mean) with its sd, approximation in Hz. Sigmoid
    rows (``subtractive``, ``multiplicative``): level = gate ``g``, input ``x``, output.
    """

    def rows():
        for k, inh in enumerate(data.inhibitory):
            for n, exc in enumerate(data.excitatory):
                yield (
                    "lif",
                    inh,
                    exc,
                    data.rate[k, n],
                    data.rate_sd[k, n],
                    data.rate_approximation[k, n],
                )
        for name, gates, values in (
            ("subtractive", data.subtractive_gates, data.subtractive),
            ("multiplicative", data.multiplicative_gates, data.multiplicative),
        ):
            for k, g in enumerate(gates):
                for m, x in enumerate(data.sigmoid_input):
                    yield (name, g, x, values[k, m], "", "")

    header = ("panel", "level", "input", "output", "output_sd", "approximation")
    return style.write_csv(path, header, rows())
