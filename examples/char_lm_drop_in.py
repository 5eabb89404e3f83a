"""A character-level language model in plain PyTorch, with a subLSTM in place of nn.LSTM.

Everything here is ordinary PyTorch (embedding, recurrent layer, linear decoder, Adam,
truncated backpropagation through time) except one line: the recurrent layer is
``microcircuits.SubLSTM`` (or ``FixSubLSTM``, or ``torch.nn.LSTM`` for comparison),
which takes the same arguments and returns the same ``(output, (h_n, c_n))``.

    python examples/char_lm_drop_in.py                    # subLSTM, 300 steps
    python examples/char_lm_drop_in.py --rnn lstm         # torch.nn.LSTM, the same model
    python examples/char_lm_drop_in.py --steps 50 --sample 0
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

import microcircuits

TEXT = (
    "The cortex is made of microcircuits: excitatory pyramidal cells and the inhibitory "
    "interneurons that shape their input and their output. Costa and colleagues read "
    "such a circuit as a gated recurrent network whose gates subtract instead of "
    "multiply: the input gate subtracts from the candidate memory, the output gate from "
    "the cell's read-out. They call it the subLSTM. "
) * 4

RNNS = {
    "sublstm": microcircuits.SubLSTM,
    "fix_sublstm": microcircuits.FixSubLSTM,
    "lstm": nn.LSTM,  # the drop-in is the other way round: any of these fits here
}


class CharLM(nn.Module):
    """Embedding -> recurrent layer -> linear decoder over the characters."""

    def __init__(self, vocab_size: int, hidden_size: int, rnn: type[nn.Module]) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.rnn = rnn(hidden_size, hidden_size, num_layers=1, batch_first=True)
        self.decoder = nn.Linear(hidden_size, vocab_size)

    def forward(
        self, tokens: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        output, state = self.rnn(self.embedding(tokens), state)  # (B, T, H)
        return self.decoder(output), state


def encode(text: str) -> tuple[Tensor, list[str]]:
    """The text as character indices, and the characters in index order."""
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text]), chars


@torch.no_grad()
def bits_per_char(model: CharLM, data: Tensor) -> float:
    """The model's cross-entropy on ``data`` read in one pass, in bits per character."""
    model.eval()
    logits, _ = model(data[None, :-1])
    loss = nn.functional.cross_entropy(logits[0], data[1:])
    model.train()
    return loss.item() / math.log(2)


def train(
    steps: int, rnn: str = "sublstm", *, hidden_size: int = 64, bptt: int = 32,
    batch_size: int = 16, lr: float = 3e-3, seed: int = 0, log_every: int = 50,
) -> tuple[CharLM, list[str], float, float]:  # fmt: skip
    """Train on :data:`TEXT` for ``steps`` steps; return the model, the characters, and
    the bits per character before and after."""
    torch.manual_seed(seed)
    data, chars = encode(TEXT)
    model = CharLM(len(chars), hidden_size, RNNS[rnn])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    before = bits_per_char(model, data)
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(data) - bptt - 1, (batch_size,))
        window = torch.stack([data[s : s + bptt + 1] for s in starts.tolist()])  # (B, T+1)
        logits, _ = model(window[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, len(chars)), window[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if log_every and step % log_every == 0:
            print(f"step {step:4d}  training loss {loss.item() / math.log(2):.3f} bits/char")
    return model, chars, before, bits_per_char(model, data)


@torch.no_grad()
def sample(model: CharLM, chars: list[str], prompt: str, length: int) -> str:
    """Greedy continuation of ``prompt`` (characters of the training text only)."""
    index = {c: i for i, c in enumerate(chars)}
    tokens = torch.tensor([[index[c] for c in prompt]])
    model.eval()
    logits, state = model(tokens)
    text = prompt
    for _ in range(length):
        next_token = logits[0, -1].argmax()
        text += chars[int(next_token)]
        logits, state = model(next_token.view(1, 1), state)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rnn", choices=sorted(RNNS), default="sublstm")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    parser.add_argument("--hidden", type=int, default=64, help="units (default: 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample", type=int, default=80, help="characters to generate")
    args = parser.parse_args(argv)

    model, chars, before, after = train(args.steps, args.rnn, hidden_size=args.hidden,
                                        seed=args.seed)  # fmt: skip
    print(f"{type(model.rnn).__name__}: {before:.3f} -> {after:.3f} bits/char on the text "
          f"({args.steps} steps)")  # fmt: skip
    if args.sample:
        print(repr(sample(model, chars, "The ", args.sample)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
