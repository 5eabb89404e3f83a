"""The rhythm figure: the period estimate and the time decoder against hand-made signals,
its refusals, the figure of a tiny trained run, and (where committed) the sMNIST runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from microcircuits.analysis.rhythm import (
    apply_step_decoder,
    decoder_score,
    fit_step_decoder,
    rhythm,
    unit_spectra,
)
from microcircuits.analysis.trained import trained_figure
from microcircuits.cli import main
from microcircuits.config import load_config
from microcircuits.runs import load_run
from microcircuits.train import train

REPO = Path(__file__).resolve().parents[1]
STEPS = np.arange(200.0)


# -- the period estimate --------------------------------------------------------------------


@pytest.mark.parametrize("period", [7.0, 17.3, 22.0, 40.0])
def test_a_sine_gives_its_period_despite_offset_and_drift(period):
    trace = 0.3 * np.sin(2 * np.pi * STEPS / period + 0.4) - 0.5 + 0.002 * STEPS
    spectrum = unit_spectra(trace)
    assert spectrum.period[0] == pytest.approx(period, rel=0.02)
    assert spectrum.share[0] > 0.9
    assert spectrum.amplitude[0] == pytest.approx(0.3 / np.sqrt(2), rel=0.05)
    assert spectrum.oscillating[0]


def test_white_noise_slow_drift_and_flat_traces_are_no_rhythm():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((200, 50))
    spectrum = unit_spectra(noise)
    assert not spectrum.oscillating.any()
    assert spectrum.share.max() < 0.3
    # 2.5 cycles of period 80 in 200 steps: fewer than 4, a drift rather than a rhythm
    slow = unit_spectra(np.sin(2 * np.pi * STEPS / 80))
    assert not slow.oscillating[0]
    assert unit_spectra(np.sin(2 * np.pi * STEPS / 80), min_cycles=2).oscillating[0]
    # a sine far below the amplitude threshold, a straight line, a constant
    tiny = unit_spectra(0.001 * np.sin(2 * np.pi * STEPS / 20))
    assert tiny.share[0] > 0.9 and not tiny.oscillating[0]
    line = unit_spectra(np.stack([3 - 0.01 * STEPS, np.full(200, 0.7)], axis=1))
    assert not line.oscillating.any()
    assert np.isnan(line.period[1]) and line.share[1] == 0 and line.amplitude[1] == 0


def test_units_are_judged_one_by_one():
    rng = np.random.default_rng(1)
    traces = np.stack([np.sin(2 * np.pi * STEPS / 21), rng.standard_normal(200)], axis=1)
    spectrum = unit_spectra(traces)
    assert spectrum.oscillating.tolist() == [True, False]
    assert spectrum.power.shape == (spectrum.frequency.size, 2)
    positive = spectrum.frequency > 0
    np.testing.assert_allclose(spectrum.power[positive].sum(axis=0), 1.0)


def test_unit_spectra_refuses_bad_traces_and_options():
    with pytest.raises(ValueError, match="too few steps for a spectrum: 10; need at least 16"):
        unit_spectra(np.zeros(10))
    with pytest.raises(ValueError, match="shape"):
        unit_spectra(np.zeros((20, 2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        unit_spectra(np.full(20, np.nan))
    with pytest.raises(ValueError, match="min_share"):
        unit_spectra(np.zeros(20), min_share=0)
    with pytest.raises(ValueError, match="min_cycles"):
        unit_spectra(np.zeros(20), min_cycles=0.5)


# -- the decoder of time --------------------------------------------------------------------


def test_decoder_of_a_state_linear_in_time_is_exact():
    # one unit, h_t = 2 t + 3: t = 0.5 h - 1.5, by hand
    t = np.arange(30.0)
    states = np.repeat((2 * t + 3)[:, None, None], 2, axis=1)  # (30, 2, 1)
    np.testing.assert_allclose(fit_step_decoder(states), [0.5, -1.5], atol=1e-9)
    # five units along a random direction, plus two units of noise that carry no time
    rng = np.random.default_rng(2)
    direction, offset = rng.standard_normal(5), rng.standard_normal(5)
    linear = t[:, None, None] * direction + offset  # (30, 1, 5)
    states = np.concatenate(
        [np.broadcast_to(linear, (30, 8, 5)), rng.standard_normal((30, 8, 2))], axis=2
    )
    weights = fit_step_decoder(states[:, :4])
    score = decoder_score(apply_step_decoder(weights, states[:, 4:]))
    assert score.r2 == pytest.approx(1.0, abs=1e-9)
    assert score.mae == pytest.approx(0.0, abs=1e-7)
    assert score.points == 30 * 4


def test_decoder_of_a_state_without_time_scores_nothing():
    rng = np.random.default_rng(3)
    states = rng.standard_normal((100, 20, 5))
    weights = fit_step_decoder(states[:, :10])
    score = decoder_score(apply_step_decoder(weights, states[:, 10:]))
    assert score.r2 < 0.05
    assert score.mae > 20  # guessing the mean of 0..99 misses by 25 on average


def test_decoder_score_by_hand():
    decoded = np.array([[0.0], [1.0], [5.0]])  # true steps 0, 1, 2
    score = decoder_score(decoded)
    assert score.mae == pytest.approx(1.0)  # (0 + 0 + 3) / 3
    assert score.r2 == pytest.approx(1 - 9 / 2)  # SSE 9, SST 2
    masked = decoder_score(decoded, np.array([[True], [True], [False]]))
    assert (masked.r2, masked.mae, masked.points) == (1.0, 0.0, 2)
    with pytest.raises(ValueError, match="too few steps to decode: 1"):
        fit_step_decoder(np.zeros((1, 3, 2)))
    with pytest.raises(ValueError, match="do not fit"):
        apply_step_decoder(np.zeros(4), np.zeros((5, 2, 2)))


# -- runs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adding_run(tmp_path_factory) -> Path:
    """A tiny subLSTM trained for 2 steps on 40-step adding sequences."""
    values = {
        "hidden_size": 6, "seq_len": 40, "batch_size": 8, "valid_size": 20, "test_size": 20,
        "steps_per_epoch": 2, "epochs": 1, "progress": False, "tensorboard": False,
        "out_dir": str(tmp_path_factory.mktemp("runs")), "run_name": "sublstm",
    }  # fmt: skip
    return train(load_config("adding", "sublstm", overrides=values)).run_dir


def test_rhythm_refuses_missing_foreign_and_short_runs(tmp_path, adding_run, capsys):
    with pytest.raises(ValueError, match="give --runs"):
        rhythm([])
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        rhythm([tmp_path / "absent"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        trained_figure("rhythm", [tmp_path / "absent"], tmp_path / "fig")
    elm = tmp_path / "elm-run"
    elm.mkdir()
    (elm / "config.json").write_text(json.dumps({"cell": "elm"}))
    with pytest.raises(ValueError, match=r"LSTM-family cells; .* trained cell 'elm' \(ELM\)"):
        rhythm([elm])
    with pytest.raises(ValueError, match="too few steps: .* have 40 steps"):
        rhythm([adding_run])  # the default window needs 200 steps, decoding 300
    with pytest.raises(ValueError, match="too few steps in window"):
        rhythm([adding_run], window=(0, 10))
    with pytest.raises(ValueError, match="sequences must be an integer >= 2"):
        rhythm([adding_run], sequences=1)
    out = str(tmp_path / "fig")
    assert main(["-q", "figure", "rhythm", "--runs", str(elm), "--out", out]) == 2
    assert "trained cell 'elm' (ELM)" in capsys.readouterr().err


def test_rhythm_figure_of_a_trained_run(tmp_path, adding_run):
    options = dict(window=(0, 20), decode_steps=30, sequences=10, units_shown=2)
    paths = trained_figure("rhythm", [adding_run], tmp_path, **options)
    assert [p.name for p in paths] == ["rhythm.png", "rhythm.pdf", "rhythm.csv"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with paths[2].open() as handle:
        rows = list(csv.DictReader(handle))

    # h for the zero input: the module's own (fused) forward, not the step recorder
    run = load_run(adding_run)
    with torch.no_grad():
        expected = run.model.rnn(torch.zeros(40, 1, 2))[0][:, 0].double().numpy()
    zero_h = [r for r in rows if r["quantity"] == "h" and r["input"] == "zero"]
    assert len(zero_h) == 2 * 40
    for row in zero_h:
        want = expected[int(row["step"]), int(row["unit"])]
        assert float(row["value"]) == pytest.approx(want, rel=1e-4, abs=1e-6)

    # the decoder: torch's least squares on the module's forward over the test inputs
    x, _ = run.task.probe(run.model, 10)
    with torch.no_grad():
        h = run.model.rnn(x)[0][:30].double()  # (30, 10, H)
    design = torch.cat([h, torch.ones(30, 10, 1, dtype=h.dtype)], dim=-1)
    steps = torch.arange(30, dtype=h.dtype)[:, None].expand(30, 10)
    weights = torch.linalg.lstsq(design[:, :5].reshape(-1, 7), steps[:, :5].reshape(-1, 1))
    decoded = (design[:, 5:].reshape(-1, 7) @ weights.solution).reshape(30, 5)
    sse = ((decoded - steps[:, 5:]) ** 2).sum()
    sst = ((steps[:, 5:] - steps[:, 5:].mean()) ** 2).sum()
    scores = {
        (r["input"], r["quantity"]): float(r["value"])
        for r in rows
        if r["quantity"] in ("r2", "mae")
    }
    assert scores["held-out", "r2"] == pytest.approx((1 - sse / sst).item(), abs=1e-4)
    mae = (decoded - steps[:, 5:]).abs().mean().item()
    assert scores["held-out", "mae"] == pytest.approx(mae, rel=1e-3)
    # adding inputs are never all zero: every step counts as after the onset
    assert scores["held-out after onset", "r2"] == scores["held-out", "r2"]


SMNIST_FIX = REPO / "results" / "smnist" / "smnist-fix_sublstm-100-seed0"


def test_committed_fix_sublstm_run_oscillates_on_its_own():
    """Panel f of balance-trained.png shows a unit cycling about every 20 steps over the
    black first rows; a zero input must show it too, and digits must follow the
    zero-input trajectory exactly until their first ink."""
    if not (SMNIST_FIX / "checkpoints" / "best.safetensors").is_file():
        pytest.skip("the committed sMNIST fix-subLSTM run is absent")
    try:
        data = rhythm([SMNIST_FIX], sequences=4)
    except (FileNotFoundError, RuntimeError) as error:  # no MNIST files here
        pytest.skip(f"MNIST is not available: {error}")
    cell = data.cells[0]
    periods = cell.early.period[cell.early.oscillating]
    assert periods.size >= 10
    assert 18 <= np.median(periods) <= 28
    assert cell.late is not None and cell.late.oscillating.sum() >= 10  # sustained
    assert cell.prefix_gap < 1e-4
