"""Independent float64 NumPy implementation of the paper's equations (Costa et al. 2017,
section 3), written from the paper and not from the library, used as the test oracle.

Weights are passed in torch's layout: W (G*H, I), R (G*H, H), gate blocks (i, f, z, o)
(fix-subLSTM: (i, z, o) plus phi).
"""

from __future__ import annotations

import numpy as np


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def step(cell, x, h, c, W, R, b, phi=None, mask=None):
    """x (B, I), h/c (B, H) -> h', c'."""
    pre = x @ W.T + h @ R.T + b
    H = h.shape[1]
    if cell == "fix_sublstm":
        i, z, o = (sigmoid(pre[:, k * H : (k + 1) * H]) for k in range(3))
        f = sigmoid(phi)[None, :]
    else:
        blocks = [pre[:, k * H : (k + 1) * H] for k in range(4)]
        i, f, o = sigmoid(blocks[0]), sigmoid(blocks[1]), sigmoid(blocks[3])
        z = np.tanh(blocks[2]) if cell == "lstm" else sigmoid(blocks[2])
    if mask is not None:
        z = z * mask
    if cell == "lstm":
        c_new = f * c + z * i
        h_new = np.tanh(c_new) * o
    else:
        c_new = f * c + z - i
        h_new = sigmoid(c_new) - o
    return h_new, c_new


def run(cell, x, params, num_layers, bidirectional, h0=None, c0=None, lengths=None):
    """x (T, B, I) -> output (T, B, D*H), h_n, c_n (L*D, B, H).

    params: dict with torch-style names mapped to numpy arrays.
    lengths: per-sequence valid lengths; padded steps give zero output and leave the
    state unchanged; the reverse direction starts at each sequence's last valid step.
    """
    T, B, _ = x.shape
    D = 2 if bidirectional else 1
    H = params["weight_hh_l0"].shape[1]
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    h0 = np.zeros((num_layers * D, B, H)) if h0 is None else h0
    c0 = np.zeros((num_layers * D, B, H)) if c0 is None else c0
    layer_in = x
    hn, cn = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            W, R = params["weight_ih" + sfx], params["weight_hh" + sfx]
            b = params.get("bias_ih" + sfx, 0) + params.get("bias_hh" + sfx, 0)
            phi = params.get("forget" + sfx)
            out = np.zeros((T, B, H))
            h_fin, c_fin = np.zeros((B, H)), np.zeros((B, H))
            for n in range(B):  # one sequence at a time: no masking logic to trust
                h = h0[layer * D + d, n : n + 1]
                c = c0[layer * D + d, n : n + 1]
                order = range(lengths[n]) if d == 0 else reversed(range(lengths[n]))
                for t in order:
                    h, c = step(cell, layer_in[t, n : n + 1], h, c, W, R, b, phi)
                    out[t, n] = h[0]
                h_fin[n], c_fin[n] = h[0], c[0]
            outs.append(out)
            hn.append(h_fin)
            cn.append(c_fin)
        layer_in = np.concatenate(outs, axis=-1)
    return layer_in, np.stack(hn), np.stack(cn)
