"""Autonomous rhythms in trained LSTM-family networks, and whether their state tells time.

On sequential MNIST the first rows of most digits are black: the input is exactly zero
for the first tens to hundreds of steps, so the network's state over them is the same
for every digit, a trajectory driven by the recurrence alone. For each trained run
(``lstm``, ``sublstm``, ``fix_sublstm``) this module records the hidden state ``h_t`` of
one layer (:func:`~microcircuits.analysis.recording.record_module`, from a zero state)

- for an all-zero input as long as the task's sequences, and
- for a batch of the task's test sequences (:meth:`~microcircuits.tasks.Task.probe`),

and measures

- per unit, the power spectrum of the zero-input ``h_t`` over a window of early steps
  (``window``, default steps 0-199) and over the steps after it: the trace is detrended
  (least-squares line), Hann-windowed and zero-padded (:func:`unit_spectra`); the
  dominant period is that of the highest peak, its *share* the fraction of the power
  within the Hann main lobe (+-2 / n cycles per step) around it;
- which units *oscillate*: a detrended standard deviation of at least
  ``min_amplitude`` (default 0.01), a share of at least ``min_share`` (default 0.5)
  and a dominant period of at most n / ``min_cycles`` steps (default: at least 4
  cycles in the window, so a slow drift does not count);
- a least-squares linear decoder of the step ``t`` from ``[h_t, 1]`` over steps
  ``0 .. decode_steps - 1`` (:func:`fit_step_decoder`), fitted on the first half of the
  test sequences and scored (R^2, mean absolute error in steps) on the other half, on
  their steps after the first non-zero input only, and on the zero input.

Until a sequence's first non-zero input its state *is* the zero-input state, so every
sequence's prefix holds the same points; a decoder with ``H + 1`` weights fits up to
``H + 1`` distinct points exactly whatever they are. The scores after the first input,
where the held-out sequences differ from the fitted ones, are the test of a time code.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .._validation import check_count, check_positive_int
from ..model_registry import LSTM_FAMILY, model_kind
from . import style
from .one_run import check_run_family
from .recording import eval_mode, record_module

__all__ = [
    "CellRhythm",
    "DecoderScore",
    "RhythmData",
    "Spectrum",
    "apply_step_decoder",
    "decoder_score",
    "fit_step_decoder",
    "plot_rhythm",
    "rhythm",
    "unit_spectra",
    "write_rhythm_csv",
]

logger = logging.getLogger(__name__)

MIN_STEPS = 16
"""The shortest trace :func:`unit_spectra` takes (4 cycles of the fastest period, 2)."""


class Spectrum(NamedTuple):
    """Per-unit spectra of ``U`` traces of ``n`` steps (:func:`unit_spectra`).

    Attributes:
        steps: ``n``, the length of the traces.
        frequency: ``(F,)`` cycles per step, ``0 .. 0.5`` on the zero-padded grid.
        power: ``(F, U)`` each unit's periodogram over ``frequency``, divided by its
            sum over ``frequency > 0`` (zeros for a constant trace).
        period: ``(U,)`` the dominant period in steps (NaN for a constant trace).
        share: ``(U,)`` the fraction of power within +-2 / n of the dominant frequency.
        amplitude: ``(U,)`` the standard deviation of the detrended trace.
        oscillating: ``(U,)`` whether the unit passes the criterion (module docstring).
    """

    steps: int
    frequency: np.ndarray
    power: np.ndarray
    period: np.ndarray
    share: np.ndarray
    amplitude: np.ndarray
    oscillating: np.ndarray


def unit_spectra(
    traces: np.ndarray,
    *,
    min_share: float = 0.5,
    min_amplitude: float = 0.01,
    min_cycles: float = 4.0,
    padding: int = 8,
) -> Spectrum:
    """Dominant period, its share of the power, and the oscillation criterion per unit.

    Args:
        traces: ``(n,)`` or ``(n, U)`` one trace per unit, ``n >= 16`` steps.
        min_share: power share the dominant peak needs, in ``(0, 1]``.
        min_amplitude: detrended standard deviation a unit needs, ``>= 0``.
        min_cycles: cycles of the dominant period the window must hold, ``>= 1``.
        padding: zero-padding factor of the FFT (a finer grid for the period), ``>= 1``.

    Raises:
        ValueError: a trace of the wrong shape, too short, not finite, or a bad option.
    """
    traces = np.asarray(traces, dtype=np.float64)
    if traces.ndim == 1:
        traces = traces[:, None]
    if traces.ndim != 2 or traces.shape[1] == 0:
        raise ValueError(f"traces must be (steps,) or (steps, units), got shape {traces.shape}")
    steps = traces.shape[0]
    if steps < MIN_STEPS:
        raise ValueError(f"too few steps for a spectrum: {steps}; need at least {MIN_STEPS}")
    if not np.isfinite(traces).all():
        raise ValueError("traces hold NaN or infinite values")
    if not 0 < min_share <= 1:
        raise ValueError(f"min_share must be in (0, 1], got {min_share}")
    if min_amplitude < 0:
        raise ValueError(f"min_amplitude must be >= 0, got {min_amplitude}")
    if min_cycles < 1:
        raise ValueError(f"min_cycles must be >= 1, got {min_cycles}")
    if int(padding) != padding or padding < 1:
        raise ValueError(f"padding must be an integer >= 1, got {padding}")

    t = np.arange(steps, dtype=np.float64)
    line = np.stack([np.ones(steps), t], axis=1)  # (n, 2)
    residual = traces - line @ np.linalg.lstsq(line, traces, rcond=None)[0]  # (n, U)
    amplitude = residual.std(axis=0)
    size = int(padding) * steps
    frequency = np.fft.rfftfreq(size)  # (F,)
    power = np.abs(np.fft.rfft(residual * np.hanning(steps)[:, None], n=size, axis=0)) ** 2
    power[0] = 0.0  # the mean is not a rhythm
    total = power.sum(axis=0)
    # a constant or straight trace leaves only rounding error after the fit
    moving = amplitude > 1e-12 * np.maximum(1.0, np.abs(traces).max(axis=0))
    power = np.divide(power, total, out=np.zeros_like(power), where=moving[None, :])
    # the highest peak at one cycle per window or faster
    searched = np.where((frequency >= 1.0 / steps)[:, None], power, -1.0)
    peak = frequency[searched.argmax(axis=0)]  # (U,)
    lobe = np.abs(frequency[:, None] - peak[None, :]) <= 2.0 / steps  # Hann main lobe
    share = np.where(moving, (power * lobe).sum(axis=0), 0.0)
    period = np.where(moving, 1.0 / peak, np.nan)
    oscillating = (
        moving
        & (amplitude >= min_amplitude)
        & (share >= min_share)
        & (np.nan_to_num(period, nan=np.inf) <= steps / min_cycles)
    )
    return Spectrum(steps, frequency, power, period, share, amplitude, oscillating)


# -- the decoder of time --------------------------------------------------------------------


class DecoderScore(NamedTuple):
    """How well decoded steps match the true ones: ``r2`` (1 - SSE / SST over the scored
    points) and ``mae`` (mean absolute error, in steps) over ``points`` points."""

    r2: float
    mae: float
    points: int


def _design(states: np.ndarray) -> np.ndarray:
    flat = states.reshape(-1, states.shape[-1])
    return np.concatenate([flat, np.ones((flat.shape[0], 1))], axis=1)


def _check_states(states: np.ndarray) -> np.ndarray:
    states = np.asarray(states, dtype=np.float64)
    if states.ndim != 3 or 0 in states.shape:
        raise ValueError(f"states must be (steps, sequences, units), got shape {states.shape}")
    if states.shape[0] < 2:
        raise ValueError(f"too few steps to decode: {states.shape[0]}; need at least 2")
    return states


def fit_step_decoder(states: np.ndarray) -> np.ndarray:
    """Least-squares weights ``(U + 1,)`` (bias last) of the step ``t`` from ``[h_t, 1]``.

    Args:
        states: ``(N, B, U)`` the states of ``B`` sequences at steps ``0 .. N - 1``.
    """
    states = _check_states(states)
    target = np.repeat(np.arange(states.shape[0], dtype=np.float64), states.shape[1])
    return np.linalg.lstsq(_design(states), target, rcond=None)[0]


def apply_step_decoder(weights: np.ndarray, states: np.ndarray) -> np.ndarray:
    """The decoded step ``(N, B)`` of states ``(N, B, U)``."""
    states = _check_states(states)
    if weights.shape != (states.shape[-1] + 1,):
        raise ValueError(
            f"weights {weights.shape} do not fit states of {states.shape[-1]} units (U + 1)"
        )
    return (_design(states) @ weights).reshape(states.shape[:2])


def decoder_score(decoded: np.ndarray, mask: np.ndarray | None = None) -> DecoderScore:
    """R^2 and mean absolute error of decoded steps ``(N, B)`` (row ``t`` = step ``t``),
    over the points where ``mask`` ``(N, B)`` is true (all by default)."""
    decoded = np.asarray(decoded, dtype=np.float64)
    if decoded.ndim != 2:
        raise ValueError(f"decoded must be (steps, sequences), got shape {decoded.shape}")
    true = np.broadcast_to(np.arange(decoded.shape[0], dtype=np.float64)[:, None], decoded.shape)
    keep = np.ones(decoded.shape, bool) if mask is None else np.asarray(mask, bool)
    if keep.shape != decoded.shape:
        raise ValueError(f"mask {keep.shape} does not match decoded {decoded.shape}")
    y, y_hat = true[keep], decoded[keep]
    if y.size == 0:
        return DecoderScore(float("nan"), float("nan"), 0)
    spread = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - ((y_hat - y) ** 2).sum() / spread if spread > 0 else float("nan")
    return DecoderScore(float(r2), float(np.abs(y_hat - y).mean()), int(y.size))


# -- trained runs ---------------------------------------------------------------------------


@dataclass
class CellRhythm:
    """One run's rhythm and time code.

    Attributes:
        run: the run's directory name.
        label: legend name (the cell's label; with the run's name when cells repeat).
        cell: registry name (colour).
        zero_h: ``(T, H)`` ``h_t`` for the all-zero input.
        shown_h: ``(T, H)`` ``h_t`` for the test sequence ``shown``.
        shown: that sequence's index among the task's test sequences.
        onsets: ``(B,)`` each test sequence's first step with non-zero input (``T`` if
            none).
        prefix_gap: the largest ``|h_t - zero_h_t|`` over the test sequences' steps
            before their onset (0 up to float rounding: the same trajectory).
        early: :class:`Spectrum` of ``zero_h`` over the ``window``.
        late: :class:`Spectrum` of ``zero_h`` after the window (``None`` if shorter than
            16 steps).
        units: ``(k,)`` the most rhythmic units (oscillating first, by share).
        decoded: ``(N, B - B // 2)`` decoded steps of the held-out sequences.
        decoded_zero: ``(N,)`` decoded steps of the zero input.
        scores: ``{"held-out": ..., "held-out after onset": ..., "zero input": ...}``
            :class:`DecoderScore` of the decoder fitted on the first ``B // 2``.
    """

    run: str
    label: str
    cell: str
    zero_h: np.ndarray
    shown_h: np.ndarray
    shown: int
    onsets: np.ndarray
    prefix_gap: float
    early: Spectrum
    late: Spectrum | None
    units: np.ndarray
    decoded: np.ndarray
    decoded_zero: np.ndarray
    scores: dict[str, DecoderScore]


@dataclass
class RhythmData:
    """Rhythm measurements of several runs on one task (:func:`rhythm`); ``criterion``
    holds ``min_share``, ``min_amplitude`` and ``min_cycles``."""

    cells: list[CellRhythm]
    task: str
    window: tuple[int, int]
    decode_steps: int
    sequences: int
    criterion: dict[str, float]


def _int_at_least(name: str, value: object, minimum: int) -> int:
    """``value`` as an int (:func:`~microcircuits._validation.check_count`) of at least
    ``minimum``."""
    number = check_count(name, value)
    if number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return number


def _check_runs(runs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The run directories, each holding a config of an LSTM-family cell (read, not
    loaded), checked before any run is loaded."""
    if isinstance(runs, (str, os.PathLike)):
        runs = [runs]
    if not runs:
        raise ValueError("rhythm measures trained runs: give --runs RUN_DIR [RUN_DIR ...]")
    return [
        check_run_family(
            run_dir,
            figure="rhythm",
            family=LSTM_FAMILY,
            shows="records the hidden state of LSTM-family cells",
            cells="lstm, sublstm or fix_sublstm",
        )
        for run_dir in runs
    ]


def _layer_h(module: torch.nn.Module, x: torch.Tensor, layer: int) -> np.ndarray:
    """``h_t`` ``(T, B, D * H)`` of one layer (directions side by side), float64."""
    records = record_module(module, x)
    directions = 2 if module.bidirectional else 1
    parts = records[layer * directions : (layer + 1) * directions]
    return torch.cat([r.h for r in parts], dim=-1).double().cpu().numpy()


def _measure_run(run, options: dict) -> CellRhythm:
    module = run.model.rnn
    layers = module.num_layers
    layer = options["layer"]
    if not -layers <= layer < layers:
        raise ValueError(f"layer must be in [{-layers}, {layers}) for {run.run_dir}, got {layer}")
    x, _ = run.task.probe(run.model, options["sequences"])  # (T, B, I)
    x = x.detach()
    steps, count = x.shape[0], x.shape[1]
    start, stop = options["window"]
    needed = max(stop, options["decode_steps"])
    if steps < needed:
        raise ValueError(
            f"too few steps: {run.run_dir}'s sequences have {steps} steps; window {(start, stop)} "
            f"and decode_steps={options['decode_steps']} need {needed}"
        )
    if count < 2 or options["shown"] >= count:
        raise ValueError(
            f"{run.run_dir}'s task gave {count} test sequences; need at least 2 and more than "
            f"shown={options['shown']}"
        )
    with torch.no_grad(), eval_mode(module):
        h = _layer_h(module, x, layer % layers)  # (T, B, H)
        zero_h = _layer_h(module, x.new_zeros(steps, 1, x.shape[-1]), layer % layers)[:, 0]
    active = (x != 0).any(dim=-1).cpu().numpy()  # (T, B)
    onsets = np.where(active.any(axis=0), active.argmax(axis=0), steps)
    prefix_gap = max(
        (float(np.abs(h[:t, b] - zero_h[:t]).max()) for b, t in enumerate(onsets) if t > 0),
        default=0.0,
    )
    criterion = options["criterion"]
    early = unit_spectra(zero_h[start:stop], **criterion)
    late = unit_spectra(zero_h[stop:], **criterion) if steps - stop >= MIN_STEPS else None
    rank = np.lexsort((-early.share, ~early.oscillating))  # oscillating first, by share
    units = rank[: options["units_shown"]]

    n, half = options["decode_steps"], count // 2
    weights = fit_step_decoder(h[:n, :half])
    decoded = apply_step_decoder(weights, h[:n, half:])
    decoded_zero = apply_step_decoder(weights, zero_h[:n, None])[:, 0]
    after_onset = np.arange(n)[:, None] >= onsets[None, half:]
    scores = {
        "held-out": decoder_score(decoded),
        "held-out after onset": decoder_score(decoded, after_onset),
        "zero input": decoder_score(decoded_zero[:, None]),
    }
    kind = model_kind(run.config.cell)
    return CellRhythm(
        run=Path(run.run_dir).name,
        label=kind.label,
        cell=kind.name,
        zero_h=zero_h,
        shown_h=h[:, options["shown"]],
        shown=options["shown"],
        onsets=onsets,
        prefix_gap=prefix_gap,
        early=early,
        late=late,
        units=units,
        decoded=decoded,
        decoded_zero=decoded_zero,
        scores=scores,
    )


def rhythm(
    runs: Sequence[str | os.PathLike[str]] = (),
    *,
    checkpoint: str = "best",
    sequences: int = 200,
    window: Sequence[int] = (0, 200),
    decode_steps: int = 300,
    shown: int = 0,
    units_shown: int = 3,
    layer: int = -1,
    min_share: float = 0.5,
    min_amplitude: float = 0.01,
    min_cycles: float = 4.0,
) -> RhythmData:
    """Record trained LSTM-family runs on zero input and test sequences; measure each
    unit's rhythm and a linear decoder of time (module docstring).

    Args:
        runs: run directories of ``--cell lstm``, ``sublstm`` or ``fix_sublstm``, one task.
        checkpoint: ``"best"`` or ``"last"``.
        sequences: test sequences recorded per run (half fit the decoder, half score it).
        window: ``(start, stop)`` the zero-input steps of the early spectrum; the late
            spectrum takes the steps from ``stop`` on.
        decode_steps: the decoder reads steps ``0 .. decode_steps - 1``.
        shown: which test sequence panel b shows.
        units_shown: how many of each run's most rhythmic units panels a and b show.
        layer: the recorded layer (``-1``: the top one, which the readout reads).
        min_share, min_amplitude, min_cycles: the oscillation criterion
            (:func:`unit_spectra`).

    Raises:
        FileNotFoundError: a run directory without ``config.json``.
        ValueError: no run, a run of another model family, runs of different tasks, bad
            options, or sequences too short for ``window`` / ``decode_steps``.
    """
    sequences = _int_at_least("sequences", sequences, 2)
    decode_steps = _int_at_least("decode_steps", decode_steps, 2)
    shown = check_count("shown", shown)
    units_shown = check_positive_int("units_shown", units_shown)
    layer = int(layer)
    if len(window) != 2:
        raise ValueError(f"window must be (start, stop), got {window!r}")
    start, stop = (check_count("window", w) for w in window)
    if stop - start < MIN_STEPS:
        raise ValueError(
            f"too few steps in window {(start, stop)}: {stop - start}; need at least {MIN_STEPS}"
        )
    criterion = dict(min_share=min_share, min_amplitude=min_amplitude, min_cycles=min_cycles)
    unit_spectra(np.zeros(MIN_STEPS), **criterion)  # checks the criterion before any load
    run_dirs = _check_runs(runs)
    options = dict(
        sequences=sequences,
        window=(start, stop),
        decode_steps=decode_steps,
        shown=shown,
        units_shown=units_shown,
        layer=layer,
        criterion=criterion,
    )

    from ..runs import load_run

    cells, tasks = [], []
    for run_dir in run_dirs:
        run = load_run(run_dir, checkpoint)
        tasks.append(run.config.task)
        if len(set(tasks)) > 1:
            raise ValueError(f"the runs trained different tasks ({sorted(set(tasks))}); give one")
        cell = _measure_run(run, options)
        logger.info(
            "rhythm: %s: %d of %d units oscillate in steps %d-%d; decoder R^2 %.3f",
            run_dir,
            cell.early.oscillating.sum(),
            cell.zero_h.shape[1],
            start,
            stop,
            cell.scores["held-out"].r2,
        )
        cells.append(cell)
    labels = [c.label for c in cells]
    for cell in cells:
        if labels.count(cell.label) > 1:
            cell.label = f"{cell.label} ({cell.run})"
    return RhythmData(cells, tasks[0], (start, stop), decode_steps, sequences, criterion)


# -- plot and CSV ---------------------------------------------------------------------------


def _mean_density(spectrum: Spectrum) -> np.ndarray:
    """``(F,)`` the mean over units of each unit's power per cycle/step (it integrates to
    1 over ``0 .. 0.5``), so windows of different lengths compare."""
    return spectrum.power.mean(axis=1) / spectrum.frequency[1]


def _period_text(spectrum: Spectrum | None) -> str:
    if spectrum is None:
        return "n/a"
    count = int(spectrum.oscillating.sum())
    if count == 0:
        return "0 units"
    return f"{count} units, period {np.median(spectrum.period[spectrum.oscillating]):.1f}"


def _plot_traces(ax, cell: CellRhythm, trace: np.ndarray, onset: int | None) -> None:
    colors = style.level_colors(len(cell.units))
    steps = np.arange(trace.shape[0])
    for color, unit in zip(colors, cell.units):
        period = cell.early.period[unit]
        mark = f"{period:.1f}" if cell.early.oscillating[unit] else "none"
        ax.plot(steps, trace[:, unit], color=color, lw=0.7, label=f"unit {unit} (period {mark})")
    if onset is not None and onset < trace.shape[0]:
        ax.axvline(onset, color=style.COLORS["net"], ls=":", lw=0.9)
    ax.set_xlim(0, trace.shape[0] - 1)
    ax.set_ylim(-1.05, 1.35)  # headroom for the legend
    ax.set_yticks([-1, 0, 1])


@style.styled
def plot_rhythm(data: RhythmData) -> Figure:
    """(a) zero-input ``h_t`` and (b) one test sequence's ``h_t`` of each run's most
    rhythmic units; (c) mean unit spectrum; (d) periods of oscillating units;
    (e) decoded against true step."""
    count = len(data.cells)
    start, stop = data.window
    fig = Figure(figsize=(max(7.5, 2.6 * count), 7.4), layout="constrained")
    FigureCanvasAgg(fig)
    outer = fig.add_gridspec(2, 1, height_ratios=(2, 1.3))
    top = outer[0].subgridspec(2, count)
    bottom = outer[1].subgridspec(1, 3, width_ratios=(1, 0.9, 1))

    for n, cell in enumerate(data.cells):
        ax_zero = fig.add_subplot(top[0, n])
        _plot_traces(ax_zero, cell, cell.zero_h, None)
        ax_zero.axvspan(start, stop, color=style.COLORS["net"], alpha=0.08, lw=0)
        ax_zero.set_title(
            f"{cell.label}, zero input\nsteps {start}-{stop}: {_period_text(cell.early)}\n"
            f"later: {_period_text(cell.late)}",
            fontsize=8,
        )
        ax_zero.legend(loc="upper left", ncols=2, fontsize=5.5, handlelength=1.2, columnspacing=0.8)
        ax_zero.tick_params(labelbottom=False)
        ax_digit = fig.add_subplot(top[1, n], sharex=ax_zero)
        onset = int(cell.onsets[cell.shown])
        _plot_traces(ax_digit, cell, cell.shown_h, onset)
        ax_digit.set_title(f"test sequence {cell.shown} (first input at step {onset})", fontsize=8)
        ax_digit.set_xlabel("step")
        if n == 0:
            ax_zero.set_ylabel("$h_t$")
            ax_digit.set_ylabel("$h_t$")
            style.panel_label(ax_zero, "a")
            style.panel_label(ax_digit, "b")

    ax_spec = fig.add_subplot(bottom[0, 0])
    for cell in data.cells:
        color = style.cell_color(cell.cell)
        for spectrum, ls, when in (
            (cell.early, "-", f"steps {start}-{stop}"),
            (cell.late, "--", "later"),
        ):
            if spectrum is None:
                continue
            keep = spectrum.frequency >= 1.0 / (stop - start)  # periods the window resolves
            ax_spec.plot(
                1.0 / spectrum.frequency[keep],
                _mean_density(spectrum)[keep],
                color=color,
                lw=0.9,
                ls=ls,
                label=f"{cell.label}, {when}",
            )
    ax_spec.set_xscale("log")
    ax_spec.set_xlabel("period (steps)")
    ax_spec.set_ylabel("power density (mean over units)")
    ax_spec.set_title("zero-input spectrum")
    ax_spec.legend(loc="upper left", fontsize=5.5)
    style.panel_label(ax_spec, "c")

    ax_hist = fig.add_subplot(bottom[0, 1])
    longest = (stop - start) / data.criterion["min_cycles"]
    bins = np.arange(2.0, max(8.0, np.ceil(longest) + 1.0), 1.0)
    tallest = 1
    for cell in data.cells:
        periods = cell.early.period[cell.early.oscillating]
        tallest = max(tallest, int(np.histogram(periods, bins)[0].max(initial=0)))
        ax_hist.hist(
            periods,
            bins=bins,
            histtype="step",
            color=style.cell_color(cell.cell),
            lw=1.2,
            label=f"{periods.size} of {cell.zero_h.shape[1]}",
        )
    ax_hist.set_xlabel(f"dominant period (steps {start}-{stop})")
    ax_hist.set_ylabel("oscillating units")
    ax_hist.set_ylim(0, 1.6 * tallest)  # headroom for the legend
    ax_hist.set_title("oscillating units' periods")
    ax_hist.legend(
        loc="upper right",
        fontsize=6,
        title="units (colours as in c)",
        title_fontsize=6,
        alignment="right",
    )
    style.panel_label(ax_hist, "d")

    ax_dec = fig.add_subplot(bottom[0, 2])
    steps = np.arange(data.decode_steps)
    ax_dec.plot(steps, steps, color=style.COLORS["net"], lw=0.7, ls=":")
    for cell in data.cells:
        color = style.cell_color(cell.cell)
        held, zero = cell.scores["held-out after onset"], cell.scores["zero input"]
        mean, spread = cell.decoded.mean(axis=1), cell.decoded.std(axis=1)
        ax_dec.fill_between(steps, mean - spread, mean + spread, color=color, alpha=0.15, lw=0)
        label = f"{cell.label}, held-out: R$^2$ {held.r2:.2f}, MAE {held.mae:.0f}"
        ax_dec.plot(steps, mean, color=color, lw=1.0, label=label)
        label = f"{cell.label}, zero input: R$^2$ {zero.r2:.2f}, MAE {zero.mae:.0f}"
        ax_dec.plot(steps, cell.decoded_zero, color=color, lw=0.9, ls="--", label=label)
    ax_dec.set_xlabel("true step")
    ax_dec.set_ylabel("decoded step")
    ax_dec.set_title("linear decoder of the step")
    fitted = f"fit on {data.sequences // 2} test sequences;\nheld-out ones scored after\n"
    # beside the axes: the curves fill the panel
    ax_dec.legend(
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        fontsize=5.5,
        title=fitted + "their first non-zero input",
        title_fontsize=5.5,
        alignment="left",
    )
    style.panel_label(ax_dec, "e")
    rule = data.criterion
    fig.suptitle(
        f"{data.task}: rhythm and time code of the hidden state (oscillating: detrended sd "
        f"$\\geq$ {rule['min_amplitude']:g}, share of power in the peak $\\geq$ "
        f"{rule['min_share']:g}, $\\geq$ {rule['min_cycles']:g} cycles in the window)",
        fontsize=9,
    )
    return fig


def _csv_rows(cell: CellRhythm, start: int, stop: int):
    """The CSV rows of one run (:func:`write_rhythm_csv`)."""

    def row(source, window="", unit="", step="", frequency="", *, quantity, value):
        return cell.run, cell.cell, source, window, unit, step, frequency, quantity, value

    for spectrum, window in ((cell.early, f"{start}-{stop}"), (cell.late, f"{stop}-")):
        if spectrum is None:
            continue
        for unit in range(spectrum.period.size):
            for quantity, values in (
                ("period", spectrum.period),
                ("power_share", spectrum.share),
                ("amplitude", spectrum.amplitude),
                ("oscillating", spectrum.oscillating.astype(int)),
            ):
                yield row("zero", window, unit, quantity=quantity, value=values[unit])
        stride = round(1.0 / (spectrum.frequency[1] * spectrum.steps))  # the padding
        density = _mean_density(spectrum)
        for k in range(stride, spectrum.frequency.size, stride):
            f, value = spectrum.frequency[k], density[k]
            yield row("zero", window, "", "", f, quantity="power_density", value=value)
    for source, score in cell.scores.items():
        for quantity in ("r2", "mae", "points"):
            yield row(source, quantity=quantity, value=getattr(score, quantity))
    for step, decoded in enumerate(cell.decoded):
        yield row("held-out", step=step, quantity="decoded_mean", value=decoded.mean())
        yield row("held-out", step=step, quantity="decoded_sd", value=decoded.std())
        value = cell.decoded_zero[step]
        yield row("zero input", step=step, quantity="decoded", value=value)
    for unit in cell.units:
        for source, trace in (("zero", cell.zero_h), (f"test {cell.shown}", cell.shown_h)):
            for step, value in enumerate(trace[:, unit]):
                yield row(source, "", int(unit), step, quantity="h", value=value)
    for index, onset in enumerate(cell.onsets):
        yield row(f"test {index}", "", index, quantity="onset", value=int(onset))
    yield row("test", quantity="prefix_gap", value=cell.prefix_gap)


def write_rhythm_csv(data: RhythmData, path: Path) -> Path:
    """Tidy CSV: ``run, cell, input, window, unit, step, frequency, quantity, value``.

    - zero input, per window (``START-STOP``, or ``STOP-`` for the steps after it): per
      unit ``period``, ``power_share``, ``amplitude``, ``oscillating`` (0/1); per
      frequency ``k / n`` (``n`` the window's steps: the grid without padding)
      ``power_density``, the mean over units of each unit's power per cycle/step (it
      integrates to 1 over ``0 .. 0.5``);
    - per decoder input (``held-out``, ``held-out after onset``, ``zero input``):
      ``r2``, ``mae``, ``points``; per step ``decoded_mean`` and ``decoded_sd`` over the
      held-out sequences, ``decoded`` for the zero input;
    - per step and shown unit, ``h`` (input ``zero`` or ``test N``);
    - per test sequence, ``onset``: its first step of non-zero input (``unit`` holds
      the sequence's index); per run, ``prefix_gap``.

    Empty fields do not apply.
    """
    start, stop = data.window
    rows = (row for cell in data.cells for row in _csv_rows(cell, start, stop))
    header = ("run", "cell", "input", "window", "unit", "step", "frequency", "quantity", "value")
    return style.write_csv(path, header, rows)
