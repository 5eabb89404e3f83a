"""Tasks on tiny sizes: shapes, data order, metrics against independent computations, and
that a few optimiser steps reduce the loss."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from microcircuits import make_rnn
from microcircuits.config import load_config
from microcircuits.data import MissingDataError, corpus_from_texts, load_mnist
from microcircuits.tasks import (
    AddingTask,
    LanguageModelTask,
    SequentialMNISTTask,
    make_task,
)
from microcircuits.tasks.models import SummedLayerStack

CELLS = ("lstm", "sublstm", "fix_sublstm")
CPU = torch.device("cpu")


def _fit(task, model, batch, steps: int, lr: float) -> tuple[float, float]:
    """Loss on ``batch`` before and after ``steps`` Adam steps on it."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    with torch.no_grad():
        before = task.train_loss(model, batch, None)[0].item()
    for _ in range(steps):
        optimizer.zero_grad()
        task.train_loss(model, batch, None)[0].backward()
        optimizer.step()
    with torch.no_grad():
        after = task.train_loss(model, batch, None)[0].item()
    return before, after


# -- adding -----------------------------------------------------------------------------


def _adding_config(cell: str = "lstm", **overrides):
    values = {"hidden_size": 8, "seq_len": 12, "batch_size": 16, "steps_per_epoch": 3}
    values |= {"valid_size": 40, "test_size": 30, "eval_batch_size": 16} | overrides
    return load_config("adding", cell, overrides=values)


@pytest.mark.parametrize("cell", CELLS)
def test_adding_model_shapes_and_learning(cell: str) -> None:
    task = make_task(_adding_config(cell), CPU)
    assert isinstance(task, AddingTask)
    model = task.build_model()
    x, y = next(task.train_batches(torch.Generator().manual_seed(1)))
    assert x.shape == (12, 16, 2) and y.shape == (16,)
    assert model(x).shape == (16, 1)
    before, after = _fit(task, model, (x, y), steps=40, lr=0.02)
    assert after < 0.5 * before


def test_adding_batches_come_from_the_generator_only() -> None:
    task = make_task(_adding_config(), CPU)
    torch.manual_seed(0)
    global_state = torch.get_rng_state()
    first = list(task.train_batches(torch.Generator().manual_seed(5)))
    again = list(task.train_batches(torch.Generator().manual_seed(5)))
    other = list(task.train_batches(torch.Generator().manual_seed(6)))
    assert len(first) == task.steps_per_epoch() == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], other[0][0])
    assert torch.equal(torch.get_rng_state(), global_state)  # global RNG untouched


def test_adding_evaluation_sets_are_fixed_and_the_metric_is_mse() -> None:
    config = _adding_config()
    task_a = AddingTask(config, CPU)
    task_b = AddingTask(config.replace(seed=9), CPU)
    valid_a, valid_b = task_a._split("valid"), task_b._split("valid")
    assert torch.equal(valid_a[0], valid_b[0])  # the same for every run seed
    assert not torch.equal(valid_a[1][:30], task_a._split("test")[1])
    model = task_a.build_model()
    evaluation = task_a.evaluate(model, "valid")
    x, y = valid_a
    with torch.no_grad():
        expected = ((model(x).squeeze(-1) - y) ** 2).mean().item()
    assert evaluation.count == 40
    assert evaluation.metric == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="split must be 'valid' or 'test', got 'train'"):
        task_a.evaluate(model, "train")


# -- sequential MNIST ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_train() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        return load_mnist("train", download=False)
    except MissingDataError:
        pytest.skip("MNIST not found (set MICROCIRCUITS_DATA)")


def _mnist_task(task: str, cell: str = "lstm", seed: int = 0) -> SequentialMNISTTask:
    config = load_config(
        task,
        cell,
        overrides={"hidden_size": 8, "batch_size": 16, "eval_batch_size": 500, "seed": seed},
    )
    return make_task(config.replace(download=False), CPU)


def test_smnist_presents_pixels_in_raster_order_scaled(mnist_train) -> None:
    images, labels = mnist_train
    task = _mnist_task("smnist")
    x = task.sequences(images[:3].reshape(3, -1))
    assert x.shape == (784, 3, 1)
    assert x.min() >= 0 and x.max() <= 1
    row, col = 14, 9  # step t is pixel (t // 28, t % 28)
    assert x[row * 28 + col, 2, 0] == images[2, row, col].float() / 255


def test_smnist_validation_is_the_last_5000_training_images(mnist_train) -> None:
    images, labels = mnist_train
    task = _mnist_task("smnist")
    valid_pixels, valid_labels = task._splits["valid"]
    train_pixels, _ = task._splits["train"]
    assert valid_pixels.shape == (5000, 784) and train_pixels.shape == (55000, 784)
    assert torch.equal(valid_labels, labels[-5000:])
    assert torch.equal(valid_pixels[0], images[55000].reshape(-1))
    assert task.steps_per_epoch() == 55000 // 16


def test_psmnist_permutation_is_fixed_by_the_seed(mnist_train) -> None:
    images, _ = mnist_train
    task, same, other = (
        _mnist_task("psmnist"),
        _mnist_task("psmnist"),
        _mnist_task("psmnist", seed=1),
    )
    permutation = task.permutation
    assert sorted(permutation.tolist()) == list(range(784))
    assert not torch.equal(permutation, torch.arange(784))
    assert torch.equal(permutation, same.permutation)
    assert not torch.equal(permutation, other.permutation)
    assert task.artifacts()["permutation"] == permutation.tolist()
    x = task.sequences(images[:1].reshape(1, -1))
    pixel = int(permutation[100])
    assert x[100, 0, 0] == images[0].reshape(-1)[pixel].float() / 255


@pytest.mark.parametrize("cell", CELLS)
def test_smnist_model_shapes_and_learning(mnist_train, cell: str) -> None:
    task = _mnist_task("smnist", cell)
    model = task.build_model()
    batch = next(task.train_batches(torch.Generator().manual_seed(0)))
    x, y = batch
    assert x.shape == (784, 16, 1) and y.shape == (16,)
    assert model(x).shape == (16, 10)
    before, after = _fit(task, model, batch, steps=6, lr=0.05)
    assert after < before


def test_smnist_accuracy_is_the_fraction_correct(mnist_train) -> None:
    task = _mnist_task("smnist")
    model = task.build_model()
    evaluation = task.evaluate(model, "valid")
    pixels, labels = task._splits["valid"]
    with torch.no_grad():
        predicted = model(task.sequences(pixels[:500])).argmax(-1)
    assert evaluation.count == 5000
    assert 0.0 <= evaluation.metric <= 1.0
    # The first eval batch alone bounds the overall fraction correct.
    first = (predicted == labels[:500]).sum().item()
    assert first <= evaluation.metric * 5000 <= first + 4500


# -- language modelling -------------------------------------------------------------------

TEXT = "the cat sat on the mat\nthe dog sat on the log\na cat and a dog\n" * 12


@pytest.fixture(scope="module")
def tiny_corpus():
    lines = TEXT.splitlines(keepends=True)
    return corpus_from_texts("tiny", TEXT, "".join(lines[:14]), "".join(lines[5:21]))


def _lm_task(corpus, cell: str = "lstm", **overrides) -> LanguageModelTask:
    values = {"hidden_size": 6, "batch_size": 4, "bptt": 5, "eval_batch_size": 2} | overrides
    config = load_config("ptb", cell, 10, values)
    return LanguageModelTask(config, CPU, corpus=corpus)


@pytest.mark.parametrize("cell", CELLS)
def test_lm_shapes_carry_and_learning(tiny_corpus, cell: str) -> None:
    task = _lm_task(tiny_corpus, cell, input_dropout=0.0, output_dropout=0.0, update_dropout=0.0)
    model = task.build_model()
    vocab = len(tiny_corpus.vocab)
    batches = list(task.train_batches(torch.Generator()))
    assert (
        len(batches)
        == task.steps_per_epoch()
        == math.ceil((tiny_corpus.train.numel() // 4 - 1) / 5)
    )
    inputs, targets = batches[0]
    assert inputs.shape == targets.shape == (5, 4)
    logits, (h, c) = model(inputs)
    assert logits.shape == (5, 4, vocab)
    assert h.shape == c.shape == (2, 4, 6)
    loss, carry = task.train_loss(model, batches[0], None)
    assert not carry[0].requires_grad and not carry[1].requires_grad
    before, after = _fit(task, model, batches[0], steps=30, lr=0.05)
    assert after < 0.7 * before


def test_lm_carry_continues_the_streams(tiny_corpus) -> None:
    """Two segments with the carry equal one forward pass over both (dropout off)."""
    task = _lm_task(tiny_corpus, input_dropout=0.0, output_dropout=0.0, update_dropout=0.0)
    model = task.build_model().eval()
    first, second = list(task.train_batches(torch.Generator()))[:2]
    with torch.no_grad():
        _, carry = task.train_loss(model, first, None)
        loss_second, _ = task.train_loss(model, second, carry)
        logits, _ = model(torch.cat([first[0], second[0]]))
        expected = F.cross_entropy(logits[5:].reshape(-1, logits.shape[-1]), second[1].reshape(-1))
    assert loss_second.item() == pytest.approx(expected.item(), rel=1e-5)


def test_lm_perplexity_is_exp_mean_nll_over_each_stream(tiny_corpus) -> None:
    task = _lm_task(tiny_corpus)
    model = task.build_model()
    evaluation = task.evaluate(model, "valid")
    # Independent: each of the 2 streams as one whole sequence, no segmenting.
    tokens = tiny_corpus.valid
    length = tokens.numel() // 2
    total, count = 0.0, 0
    with torch.no_grad():
        for stream in tokens[: 2 * length].view(2, length):
            logits, _ = model(stream[:-1].unsqueeze(1))
            total += F.cross_entropy(logits.squeeze(1), stream[1:], reduction="sum").item()
            count += length - 1
    assert evaluation.count == count
    assert evaluation.metric == pytest.approx(math.exp(total / count), rel=1e-5)
    assert evaluation.loss == pytest.approx(total / count, rel=1e-5)


def test_lm_steps_per_epoch_cap(tiny_corpus) -> None:
    task = _lm_task(tiny_corpus, steps_per_epoch=2)
    assert task.steps_per_epoch() == 2
    assert len(list(task.train_batches(torch.Generator()))) == 2


def test_lm_loss_summed_over_time_scales_the_gradient_steps_take(tiny_corpus, tmp_path) -> None:
    """One plain-SGD step on the loss summed over the 5 BPTT steps moves every weight 5x
    as far as one on the per-token mean; the logged loss is per token either way."""
    from microcircuits.checkpoint import load_checkpoint
    from microcircuits.train import train

    moved, logged = {}, {}
    for summed in (False, True):
        task = _lm_task(
            tiny_corpus, optimizer="sgd", lr=0.01, momentum=0.0, weight_decay=0.0,
            clip_norm=None, input_dropout=0.0, output_dropout=0.0, update_dropout=0.0,
            loss_sum_over_time=summed, max_steps=1, checkpoint_every=1, progress=False,
            tensorboard=False, out_dir=str(tmp_path), run_name=f"summed-{summed}",
        )  # fmt: skip
        assert task.gradient_scale(next(task.train_batches(torch.Generator()))) == (
            5.0 if summed else 1.0
        )
        torch.manual_seed(0)
        start = {k: v.clone() for k, v in task.build_model().state_dict().items()}
        train(task.config, task=task)
        run = tmp_path / f"summed-{summed}"
        end = load_checkpoint(run / "checkpoints" / "last.safetensors")["model"]
        moved[summed] = end["decoder.weight"] - start["decoder.weight"]
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        logged[summed] = next(r["loss"] for r in records if r["kind"] == "train")
    assert moved[False].abs().max() > 0
    torch.testing.assert_close(moved[True], 5 * moved[False], rtol=1e-3, atol=5e-7)
    assert logged[True] == pytest.approx(logged[False], rel=1e-6)


def test_lm_embedding_size_can_differ_from_the_hidden_size(tiny_corpus) -> None:
    task = _lm_task(tiny_corpus, embedding_size=9)
    model = task.build_model()
    assert model.embedding.weight.shape == (len(tiny_corpus.vocab), 9)
    assert model.rnn.weight_ih_l0.shape[1] == 9 and model.decoder.weight.shape[1] == 6
    loss, _ = task.train_loss(model, next(task.train_batches(torch.Generator())), None)
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="embedding_size"):
        _lm_task(tiny_corpus, embedding_size=0)


def test_lm_training_loss_and_gradients_equal_cross_entropy_of_the_logits(tiny_corpus) -> None:
    """The fused training loss (decoder + cross-entropy in one step) against
    ``F.cross_entropy`` of the model's logits: same loss, same gradient on every weight."""
    task = _lm_task(tiny_corpus, input_dropout=0.0, output_dropout=0.0, update_dropout=0.0)
    model = task.build_model().double()
    inputs, targets = next(task.train_batches(torch.Generator()))
    params = list(model.parameters())
    loss, _ = task.train_loss(model, (inputs, targets), None)
    ours = torch.autograd.grad(loss, params)
    logits, _ = model(inputs)
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    for g, r in zip(ours, torch.autograd.grad(ref, params)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"targets must have the shape of tokens \(5, 4\)"):
        model(inputs, None, targets=targets[:3])


def test_lm_tied_embeddings_share_one_parameter_whose_gradient_sums_both_uses(
    tiny_corpus,
) -> None:
    """Tied: one (V, H) parameter; its gradient equals the embedding's plus the decoder's
    gradient in an untied copy with the same weights (the chain rule over both uses)."""
    kw = dict(input_dropout=0.0, output_dropout=0.0, update_dropout=0.0)
    tied = _lm_task(tiny_corpus, tie_embeddings=True, **kw).build_model().double()
    untied = _lm_task(tiny_corpus, **kw).build_model().double()
    assert tied.decoder.weight is tied.embedding.weight
    names = {n for n, _ in tied.named_parameters()}
    assert "decoder.weight" not in names and "embedding.weight" in names
    assert (
        sum(p.numel() for p in tied.parameters())
        == sum(p.numel() for p in untied.parameters()) - untied.decoder.weight.numel()
    )
    untied.load_state_dict(tied.state_dict())  # both keys: the same tensor
    task = _lm_task(tiny_corpus, **kw)
    batch = next(task.train_batches(torch.Generator()))
    loss_tied, _ = task.train_loss(tied, batch, None)
    loss_untied, _ = task.train_loss(untied, batch, None)
    assert loss_tied.item() == pytest.approx(loss_untied.item(), rel=1e-12)
    loss_tied.backward()
    loss_untied.backward()
    torch.testing.assert_close(
        tied.embedding.weight.grad, untied.embedding.weight.grad + untied.decoder.weight.grad
    )


def test_lm_tied_embeddings_need_word_vectors_as_wide_as_the_state(tiny_corpus) -> None:
    with pytest.raises(ValueError, match="tie_embeddings=True needs .*embedding_size=9"):
        _lm_task(tiny_corpus, tie_embeddings=True, embedding_size=9)


def test_summed_layer_stack_equals_two_torch_lstm_layers_summed(tiny_corpus) -> None:
    """``skip_connections``: the stack's output is layer 1's plus layer 2's output, each
    from a ``torch.nn.LSTM`` layer holding the same weights (the independent
    reference); the final states are the layers' own; dropout acts only in training."""
    task = _lm_task(tiny_corpus, skip_connections=True, input_dropout=0.3, dropout=0.2,
                    output_dropout=0.4, update_dropout=0.1)  # fmt: skip
    model = task.build_model().double().eval()
    stack = model.rnn
    assert isinstance(stack, SummedLayerStack) and stack.num_layers == 2
    plain = _lm_task(tiny_corpus).build_model()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    refs = [nn.LSTM(6, 6).double(), nn.LSTM(6, 6).double()]
    for ref, layer in zip(refs, stack.layers):
        ref.load_state_dict({k: v for k, v in layer.state_dict().items() if k in ref.state_dict()})
    x = torch.randn(7, 3, 6, dtype=torch.double)
    h0 = torch.randn(2, 3, 6, dtype=torch.double)
    c0 = torch.randn(2, 3, 6, dtype=torch.double)
    out1, (h1, c1) = refs[0](x, (h0[:1], c0[:1]))
    out2, (h2, c2) = refs[1](out1, (h0[1:], c0[1:]))
    output, (h_n, c_n) = stack(x, (h0, c0))
    torch.testing.assert_close(output, out1 + out2)
    torch.testing.assert_close(h_n, torch.cat([h1, h2]))
    torch.testing.assert_close(c_n, torch.cat([c1, c2]))
    stack.train()
    assert not torch.equal(stack(x, (h0, c0))[0], output)
    with pytest.raises(ValueError, match=r"hx must hold 2 layers' states, got h0 \(1, 3, 6\)"):
        stack(x, (h0[:1], c0[:1]))


def test_summed_layer_stack_sends_the_readout_gradient_to_the_first_layer_directly() -> None:
    """With layer 2's weights zeroed (its output constant), the stack's input gradient is
    layer 1's alone (the sum's identity path), where a plain two-layer stack of the
    same weights passes none."""
    layers = [make_rnn("sublstm", 4, 5), make_rnn("sublstm", 5, 5)]
    with torch.no_grad():
        for p in layers[1].parameters():
            p.zero_()
    stack = SummedLayerStack(layers)
    plain = make_rnn("sublstm", 4, 5, num_layers=2)
    plain.load_state_dict(
        {k.replace("_l0", "_l1") if i else k: v
         for i, layer in enumerate(layers) for k, v in layer.state_dict().items()}
    )  # fmt: skip
    x = torch.randn(6, 2, 4, requires_grad=True)
    upstream = torch.randn(6, 2, 5)
    (ours,) = torch.autograd.grad(stack(x)[0], x, upstream)
    (first,) = torch.autograd.grad(layers[0](x)[0], x, upstream)
    (none,) = torch.autograd.grad(plain(x)[0], x, upstream)
    torch.testing.assert_close(ours, first)
    assert first.abs().max() > 1e-3
    torch.testing.assert_close(none, torch.zeros_like(none))
    with pytest.raises(ValueError, match=r"one hidden size, got \[5, 6\]"):
        SummedLayerStack([make_rnn("lstm", 4, 5), make_rnn("lstm", 5, 6)])
    with pytest.raises(ValueError, match="at least one layer"):
        SummedLayerStack([])


def test_skip_connections_must_be_a_boolean() -> None:
    config = load_config("ptb", "lstm", 10)
    config.skip_connections = "yes"
    with pytest.raises(TypeError, match=r"skip_connections must be true or false, got str"):
        config.validate()
