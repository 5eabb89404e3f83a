"""Spiking Heidelberg Digits and SHD-Adding, the long-range tasks of the ELM paper.

Spieler et al. (ICLR 2024, section 4.2 and appendix) train the ELM neuron on the Spiking
Heidelberg Digits (Cramer et al. 2020; :mod:`microcircuits.data.shd`) and on SHD-Adding,
which they introduce: two digits drawn uniformly and independently, presented one after
the other, the target their sum (``label % 10`` each, whatever the language): 19
classes, 0..18. As there (and in their published loader):

- each digit is cut to its first second and binned; ``config.seq_len`` is the number of
  bins per digit, so the bin is ``1000 / seq_len`` ms (the paper's default 2 ms:
  ``seq_len = 500``; SHD-Adding sequences are then 1,000 steps long);
- the input of a step is the spike count of each of the 700 channels in its bin;
- the validation split is a random 20 % of the training file (the published split:
  ``numpy.random.default_rng(0).binomial(1, 0.2, N)``, the same for every run); the test
  split is the test file (its speakers include two absent from training);
- the class is read out at the last step (cross-entropy; metric: accuracy);
- SHD-Adding draws fresh random pairs for every training batch (``steps_per_epoch`` of
  them an epoch: the paper 2,000) from the training split; its validation and test sets
  are ``valid_size`` and ``test_size`` fixed pairs (the published notebook: 500 and
  2,000 batches of 8) of the validation split and the test file, drawn from constant
  seeds, the same for every run;
- the input is dropped out with probability 0.5 during training (the paper's "dropout
  probability 0.5"; the published notebook zeroes each input bin with that probability).
  Ours: inverted dropout (kept bins x2) and none at evaluation, so evaluation is
  deterministic; the published notebook also drops at evaluation, unscaled.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ExperimentConfig
from ..data.registry import resolve_data_dir
from ..data.shd import SHD_CHANNELS, SHD_CLASSES, BinnedSHD, SHDSpikes, load_shd
from .base import Batch, Carry, Evaluation, Probe, check_split
from .models import make_last_step_model

__all__ = [
    "ADDING_CLASSES",
    "DIGIT_SECONDS",
    "INPUT_DROPOUT",
    "SHDAddingTask",
    "SHDTask",
    "VALID_FRACTION",
    "cached_shd",
    "published_split",
]

DIGIT_SECONDS = 1.0  # each digit is cut to its first second
VALID_FRACTION = 0.2  # of the training file held out for validation (the paper's)
INPUT_DROPOUT = 0.5  # the paper's dropout probability, on the input bins
ADDING_CLASSES = 19  # sums 0..18
_SPLIT_SEEDS = {"valid": 0x54D_0001, "test": 0x54D_0002}

_LOADED: dict[tuple[str, Path], SHDSpikes] = {}


def cached_shd(split: str, data_dir: str | None, *, download: bool = True) -> SHDSpikes:
    """:func:`~microcircuits.data.shd.load_shd`, kept for the life of the process."""
    key = (split, resolve_data_dir(data_dir))
    if key not in _LOADED:
        _LOADED[key] = load_shd(split, data_dir, download=download)
    return _LOADED[key]


def published_split(count: int, fraction: float = VALID_FRACTION, seed: int = 0) -> np.ndarray:
    """Which of ``count`` training samples are held out for validation (bool ``(N,)``):
    the published loader's ``default_rng(seed).binomial(1, fraction, count)``."""
    rng = np.random.default_rng(seed)
    return rng.binomial(1, fraction, size=count).astype(bool)


class _SHDClassification:
    """What both tasks share: the files, the split, binning, the model, loss and accuracy.

    Args:
        config: the run's config (``seq_len``: bins per digit).
        device: where the model and batches live.
        spikes: ``{"train": ..., "test": ...}`` to use instead of loading the verified
            files (e.g. small synthetic ones in tests).
        input_dropout: probability of dropping an input bin during training.
    """

    name = "shd"
    metric = "accuracy"  # TASK_KINDS["shd"].metric
    higher_is_better = True
    classes = SHD_CLASSES
    digits = 1  # digits per sequence

    def __init__(
        self,
        config: ExperimentConfig,
        device: torch.device,
        *,
        spikes: dict[str, SHDSpikes] | None = None,
        input_dropout: float = INPUT_DROPOUT,
    ) -> None:
        seq_len = config.seq_len
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(
                f"seq_len is the number of time bins per digit for {self.name} (its first "
                f"second; the paper's 2 ms bins: 500), got {seq_len!r}"
            )
        if not 0.0 <= input_dropout < 1.0:
            raise ValueError(f"input_dropout must be in [0, 1), got {input_dropout}")
        self.config = config
        self.device = device
        self.input_dropout = float(input_dropout)
        self.num_bins = seq_len
        self.bin_seconds = DIGIT_SECONDS / seq_len
        if spikes is None:
            spikes = {
                split: cached_shd(split, config.data_dir, download=config.download)
                for split in ("train", "test")
            }
        train = spikes["train"]
        held_out = published_split(len(train))
        parts = {
            "train": train.subset(np.flatnonzero(~held_out)),
            "valid": train.subset(np.flatnonzero(held_out)),
            "test": spikes["test"],
        }
        self.splits = {
            name: BinnedSHD(part, self.num_bins, self.bin_seconds) for name, part in parts.items()
        }

    # -- batches ------------------------------------------------------------------------

    def sequences(self, split: str, *index: Tensor) -> Tensor:
        """The model's input ``(digits * num_bins, B, 700)`` on the device: the digits of
        ``split`` at each ``index`` ``(B,)``, one after the other."""
        binned = self.splits[split]
        dense = torch.cat([binned.dense(i) for i in index], dim=1)  # (B, T, 700)
        return dense.transpose(0, 1).contiguous().to(self.device)

    def _drop(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if self.input_dropout == 0.0:
            return x
        keep = torch.rand(x.shape, generator=generator) >= self.input_dropout
        return x * keep.to(x.device) / (1.0 - self.input_dropout)

    def targets(self, split: str, *index: Tensor) -> Tensor:
        labels = self.splits[split].labels
        if len(index) == 1:
            return labels[index[0]]
        return sum(labels[i] % 10 for i in index)  # SHD-Adding: the digits' values

    def evaluation_index(self, split: str) -> tuple[Tensor, ...]:
        """The samples (SHD) or pairs (SHD-Adding) ``split`` is evaluated on."""
        return (torch.arange(len(self.splits[split])),)

    # -- the Task protocol --------------------------------------------------------------

    def build_model(self) -> nn.Module:
        model = make_last_step_model(
            self.config, input_size=SHD_CHANNELS, out_features=self.classes
        )
        return model.to(self.device)

    def train_loss(self, model: nn.Module, batch: Batch, carry: Carry) -> tuple[Tensor, Carry]:
        x, y = batch  # (T, B, 700), (B,)
        return F.cross_entropy(model(x).float(), y), None

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> Evaluation:
        index = self.evaluation_index(check_split(split))
        model.eval()
        total_loss, correct, count = 0.0, 0, int(index[0].numel())
        for start in range(0, count, self.config.eval_batch_size):
            part = tuple(i[start : start + self.config.eval_batch_size] for i in index)
            logits = model(self.sequences(split, *part)).float()
            y = self.targets(split, *part).to(self.device)
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(dim=-1) == y).sum().item()
        return Evaluation(loss=total_loss / count, metric=correct / count, count=count)

    def probe(self, model: nn.Module, size: int) -> Probe:
        part = tuple(i[:size] for i in self.evaluation_index("test"))
        x, y = self.sequences("test", *part), self.targets("test", *part).to(self.device)
        return x, lambda output: F.cross_entropy(model.readout(output[-1]), y)

    def artifacts(self) -> dict[str, Any]:
        return {
            "bin_ms": 1000.0 * self.bin_seconds,
            "bins_per_digit": self.num_bins,
            "digits_per_sequence": self.digits,
            "input_dropout": self.input_dropout,
            "validation": f"published split: default_rng(0).binomial(1, {VALID_FRACTION}) "
            "of the training file",
            "samples": {name: len(binned) for name, binned in self.splits.items()},
        }


class SHDTask(_SHDClassification):
    """Classify a spoken digit (20 classes: 10 digits in 2 languages) from its spikes."""

    name = "shd"

    def steps_per_epoch(self) -> int:
        full = len(self.splits["train"]) // self.config.batch_size  # drop the tail
        cap = self.config.steps_per_epoch
        return full if cap is None else min(full, cap)

    def train_batches(self, generator: torch.Generator) -> Iterator[Batch]:
        order = torch.randperm(len(self.splits["train"]), generator=generator)
        size = self.config.batch_size
        for step in range(self.steps_per_epoch()):
            index = order[step * size : (step + 1) * size]
            x = self._drop(self.sequences("train", index), generator)
            yield x, self.targets("train", index).to(self.device)


class SHDAddingTask(_SHDClassification):
    """SHD-Adding: the sum of two spoken digits heard one after the other (19 classes)."""

    name = "shd_adding"
    classes = ADDING_CLASSES
    digits = 2

    def __init__(self, config: ExperimentConfig, device: torch.device, **kwargs: Any) -> None:
        if config.steps_per_epoch is None:
            raise ValueError(
                "steps_per_epoch must be set for shd_adding (its pairs are drawn without "
                "end; the paper: 2000), got None; e.g. --set steps_per_epoch=2000"
            )
        super().__init__(config, device, **kwargs)
        self._pairs: dict[str, tuple[Tensor, Tensor]] = {}

    def steps_per_epoch(self) -> int:
        return self.config.steps_per_epoch

    def _draw_pairs(self, split: str, count: int, generator: torch.Generator):
        # as the published loader: 2 * count uniform draws with replacement, the first
        # half the first digits, the second half the second ones
        drawn = torch.randint(len(self.splits[split]), (2 * count,), generator=generator)
        return drawn[:count], drawn[count:]

    def train_batches(self, generator: torch.Generator) -> Iterator[Batch]:
        for _ in range(self.steps_per_epoch()):
            first, second = self._draw_pairs("train", self.config.batch_size, generator)
            x = self._drop(self.sequences("train", first, second), generator)
            yield x, self.targets("train", first, second).to(self.device)

    def evaluation_index(self, split: str) -> tuple[Tensor, ...]:
        if split not in self._pairs:
            size = self.config.valid_size if split == "valid" else self.config.test_size
            generator = torch.Generator().manual_seed(_SPLIT_SEEDS[split])
            self._pairs[split] = self._draw_pairs(split, size, generator)
        return self._pairs[split]

    def artifacts(self) -> dict[str, Any]:
        info = super().artifacts()
        info["pairs"] = {
            "valid": self.config.valid_size,
            "test": self.config.test_size,
            "seeds": dict(_SPLIT_SEEDS),
        }
        return info
