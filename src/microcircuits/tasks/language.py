"""Word-level language modelling (Penn Treebank, WikiText-2) with truncated BPTT.

The training split is cut into ``batch_size`` parallel streams and walked in segments
of ``bptt`` steps, in the same order every epoch; the hidden state is carried from one
segment to the next (detached, so gradients stop at the segment boundary) and reset at
the start of each epoch. Perplexity is ``exp`` of the mean next-token cross-entropy over
the split (``<eos>`` tokens included), evaluated with ``eval_batch_size`` streams whose
state is also carried across segments. As usual for this batching, the last
``len(split) % eval_batch_size`` tokens (fewer than one per stream) are not scored.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ExperimentConfig
from ..data import Corpus, batchify, bptt_batches, load_corpus, resolve_data_dir
from ..task_registry import TASK_KINDS
from .base import Batch, Carry, Evaluation, Probe, check_split
from .models import LanguageModel, make_recurrent_stack

__all__ = ["LanguageModelTask", "cached_corpus"]

_CORPORA: dict[tuple[str, Path], Corpus] = {}


def cached_corpus(name: str, data_dir: str | None, *, download: bool = True) -> Corpus:
    """:func:`~microcircuits.data.load_corpus`, kept for the life of the process
    (``microcircuits compare`` trains three models on one corpus)."""
    key = (name, resolve_data_dir(data_dir))
    if key not in _CORPORA:
        _CORPORA[key] = load_corpus(name, data_dir, download=download)
    return _CORPORA[key]


def _detach(hidden: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return hidden[0].detach(), hidden[1].detach()


class LanguageModelTask:
    """Next-word prediction on ``config.task`` (``"ptb"`` or ``"wikitext2"``).

    Args:
        config: the run's config.
        device: where the model and data live.
        corpus: use this corpus instead of loading ``config.task`` (e.g. a tiny one in
            tests).
    """

    metric = TASK_KINDS["ptb"].metric  # and wikitext2's, the same
    higher_is_better = TASK_KINDS["ptb"].higher_is_better

    def __init__(
        self, config: ExperimentConfig, device: torch.device, *, corpus: Corpus | None = None
    ) -> None:
        self.config = config
        self.device = device
        self.name = config.task
        if corpus is None:
            corpus = cached_corpus(config.task, config.data_dir, download=config.download)
        self.corpus = corpus
        self.vocab_size = len(corpus.vocab)
        self._train = batchify(corpus.train, config.batch_size).to(device)  # (N, B)
        self._eval = {
            split: batchify(corpus.split(split), config.eval_batch_size).to(device)
            for split in ("valid", "test")
        }

    def probe(self, model: nn.Module, size: int, steps: int = 100) -> Probe:
        """``size`` test streams of ``steps`` words, embedded; loss: the next word's NLL."""
        tokens = batchify(self.corpus.test, size)[: steps + 1].to(self.device)  # (T+1, B)
        with torch.no_grad():
            x = model.embedding(tokens[:-1])  # (T, B, H)
        target = tokens[-1]
        return x, lambda output: F.cross_entropy(model.decoder(output[-1]), target)

    def build_model(self) -> nn.Module:
        embedding = self.config.embedding_size or self.config.hidden_size
        rnn = make_recurrent_stack(self.config, input_size=embedding)
        model = LanguageModel(
            rnn,
            self.vocab_size,
            self.config.hidden_size,
            embedding,
            tie_embeddings=self.config.tie_embeddings,
        )
        return model.to(self.device)

    def steps_per_epoch(self) -> int:
        full = len(bptt_batches(self._train, self.config.bptt))
        cap = self.config.steps_per_epoch
        return full if cap is None else min(full, cap)

    def train_batches(self, generator: torch.Generator) -> Iterator[Batch]:
        # The order is fixed: the hidden state carried between segments needs the
        # streams in sequence. ``generator`` is unused.
        segments = bptt_batches(self._train, self.config.bptt)
        for _ in range(self.steps_per_epoch()):
            yield next(segments)

    def train_loss(self, model: nn.Module, batch: Batch, carry: Carry) -> tuple[Tensor, Carry]:
        inputs, targets = batch  # (T, B) each
        hidden = None if carry is None else (carry[0], carry[1])
        loss, hidden = model(inputs, hidden, targets=targets)  # mean over the T * B tokens
        return loss, _detach(hidden)

    def gradient_scale(self, batch: Batch) -> float:
        # the loss summed over the segment's steps (Zaremba et al.'s convention), or the mean
        return float(batch[0].shape[0]) if self.config.loss_sum_over_time else 1.0

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> Evaluation:
        data = self._eval[check_split(split)]
        model.eval()
        total, count = 0.0, 0
        hidden = None
        for inputs, targets in bptt_batches(data, self.config.bptt):
            logits, hidden = model(inputs, hidden)
            total += F.cross_entropy(
                logits.float().reshape(-1, self.vocab_size), targets.reshape(-1), reduction="sum"
            ).item()
            count += targets.numel()
        loss = total / count
        return Evaluation(loss=loss, metric=math.exp(loss), count=count)

    def artifacts(self) -> dict[str, Any]:
        return {
            "corpus": self.corpus.name,
            "vocab_size": self.vocab_size,
            "tokens": {s: int(self.corpus.split(s).numel()) for s in ("train", "valid", "test")},
        }
