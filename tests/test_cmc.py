"""The canonical microcircuit (CMC) against independent truth: SPM's equations
(``spm_fx_cmc``) written out again here in plain Python floats, the resting state as a
fixed point, float64 finite differences, and the torchdiffeq solvers against each other
(fixed step vs adaptive, adjoint vs backpropagation through the steps)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import microcircuits as mc
from microcircuits.cmc import cmc_dynamics, cmc_network_dynamics, models
from microcircuits.cmc.dynamics import intrinsic_matrix

# -- SPM's equations, independently, in plain Python -----------------------------------

SPM_T_MS = (2.0, 2.0, 16.0, 28.0)
SPM_G = tuple(200.0 * g for g in (4, 4, 8, 4, 4, 2, 4, 4, 2, 1))
SPM_E = (200.0, 100.0, 200.0, 100.0)
SPM_G_FREE = (7, 2, 3, 4)  # 1-based: P.G(:,k) scales G(j(k))


def spm_firing(v: float, log_S: float = 0.0) -> float:
    slope = 2.0 / 3.0 * math.exp(log_S)
    return 1.0 / (1.0 + math.exp(-slope * v)) - 1.0 / (1.0 + math.exp(0.0))


def spm_flow(x, u, log_T=(0.0,) * 4, log_G=(0.0,) * 4, log_S=0.0, log_C=0.0, ext=(0.0,) * 4):
    """dx/dt of one source, line by line as spm_fx_cmc; ``ext`` = (A1 S_sp', A2 S_sp',
    A3 S_dp', A4 S_dp'), the extrinsic inputs already summed over sources."""
    T = [t / 1000.0 * math.exp(l) for t, l in zip(SPM_T_MS, log_T)]
    G = list(SPM_G)
    for k, j in enumerate(SPM_G_FREE):
        G[j - 1] *= math.exp(log_G[k])
    S = [spm_firing(v, log_S) for v in x]
    U = math.exp(log_C) * u * 32.0
    f = [0.0] * 8
    f[1] = (ext[0] + U - G[0] * S[0] - G[2] * S[4] - G[1] * S[2] - 2 * x[1] - x[0] / T[0]) / T[0]
    f[3] = (-ext[2] + G[7] * S[0] - G[6] * S[2] - 2 * x[3] - x[2] / T[1]) / T[1]
    f[5] = (-ext[3] + G[4] * S[0] + G[5] * S[6] - G[3] * S[4] - 2 * x[5] - x[4] / T[2]) / T[2]
    f[7] = (ext[1] - G[9] * S[6] - G[8] * S[4] - 2 * x[7] - x[6] / T[3]) / T[3]
    f[0], f[2], f[4], f[6] = x[1], x[3], x[5], x[7]
    return f


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


STATE = [0.8, -3.0, -0.5, 12.0, 1.7, -0.4, -2.2, 6.0]
PARAMS = dict(log_T=(0.1, -0.2, 0.3, -0.05), log_G=(0.2, -0.3, 0.1, 0.4), log_S=0.25, log_C=-0.5)


# -- (a) one column -------------------------------------------------------------------


def test_single_worked_value():
    # x = v_ss = 1, everything else at rest, prior parameters: only ss, sp and ii feel it.
    x = t64([1.0] + [0.0] * 7)
    got = cmc_dynamics(x, 0.0)
    s = 1 / (1 + math.exp(-2 / 3)) - 0.5  # 0.16076...
    assert s == pytest.approx(0.1607564)
    assert got[1].item() == pytest.approx((-800 * s - 1 / 0.002) / 0.002, rel=1e-12)
    assert got[1].item() == pytest.approx(-314302.5, rel=1e-6)
    assert got[3].item() == pytest.approx(800 * s / 0.002, rel=1e-12)  # ss -> sp, G8
    assert got[5].item() == pytest.approx(800 * s / 0.016, rel=1e-12)  # ss -> ii, G5
    assert got[7].item() == 0.0 and got[0].item() == 0.0


@pytest.mark.parametrize("with_params", [False, True])
def test_single_matches_spm_equations(with_params):
    kwargs = PARAMS if with_params else {}
    u = 0.7
    expected = spm_flow(STATE, u, **kwargs)
    tensors = {k: t64(v) for k, v in kwargs.items()}
    got = cmc_dynamics(t64(STATE), t64(u), **tensors)
    torch.testing.assert_close(got, t64(expected), rtol=1e-12, atol=1e-9)


def test_exogenous_input_enters_spiny_stellate_with_gain_32():
    x = torch.zeros(8, dtype=torch.float64)
    got = cmc_dynamics(x, t64(0.5), log_C=t64(math.log(3.0)))
    expected = torch.zeros(8, dtype=torch.float64)
    expected[1] = 32 * 3.0 * 0.5 / 0.002
    torch.testing.assert_close(got, expected)


def test_intrinsic_matrix_places_each_G():
    G = torch.arange(1.0, 11.0)  # G_k = k
    expected = torch.tensor(
        [[-1.0, -2, -3, 0], [8, -7, 0, 0], [5, 0, -4, 6], [0, 0, -9, -10]]
    )  # target x source, order ss, sp, ii, dp
    torch.testing.assert_close(intrinsic_matrix(G), expected)


def test_rest_is_a_fixed_point():
    zeros = torch.zeros(5, 8, dtype=torch.float64)
    params = dict(
        log_T=torch.randn(5, 4, dtype=torch.float64),
        log_G=torch.randn(5, 4, dtype=torch.float64),
        log_S=torch.randn(5, dtype=torch.float64),
        log_C=torch.randn(5, dtype=torch.float64),
    )
    assert torch.equal(cmc_dynamics(zeros, torch.zeros(5, dtype=torch.float64), **params), zeros)
    nodes = torch.zeros(5, 3, 8, dtype=torch.float64)
    log_A = torch.randn(4, 3, 3, dtype=torch.float64)
    assert torch.equal(cmc_network_dynamics(nodes, 0.0, log_A), nodes)
    assert cmc_dynamics(zeros[0], 1.0).abs().sum() > 0  # and input moves it


def test_batched_and_broadcast_equal_one_by_one():
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    u = torch.randn(3, dtype=torch.float64)
    log_T = 0.1 * torch.randn(3, 4, dtype=torch.float64)
    log_G = 0.1 * torch.randn(4, dtype=torch.float64)
    log_S = 0.1 * torch.randn(2, 1, dtype=torch.float64)
    got = cmc_dynamics(x, u, log_T, log_G, log_S)
    assert got.shape == (2, 3, 8)
    for i in range(2):
        for j in range(3):
            expected = spm_flow(
                x[i, j].tolist(), u[j].item(), log_T[j].tolist(), log_G.tolist(), log_S[i, 0].item()
            )
            torch.testing.assert_close(got[i, j], t64(expected), rtol=1e-12, atol=1e-9)


def test_gradcheck_single():
    inputs = (
        torch.randn(3, 8, dtype=torch.float64),
        torch.randn(3, dtype=torch.float64),
        0.1 * torch.randn(3, 4, dtype=torch.float64),
        0.1 * torch.randn(4, dtype=torch.float64),
        0.1 * torch.randn(3, dtype=torch.float64),
        0.1 * torch.randn((), dtype=torch.float64),
    )
    inputs = tuple(t.requires_grad_() for t in inputs)
    # Scaled to O(1): the raw derivatives reach 1e5 / s, which finite differences dislike.
    assert torch.autograd.gradcheck(lambda *a: cmc_dynamics(*a) * 1e-4, inputs)


# -- (b) several columns --------------------------------------------------------------


def two_node_log_A(forward: float, backward: float) -> torch.Tensor:
    log_A = torch.full((4, 2, 2), float("-inf"), dtype=torch.float64)
    log_A[0, 1, 0] = forward  # forward sp -> ss, node 0 -> node 1
    log_A[1, 1, 0] = forward + 0.3  # forward sp -> dp
    log_A[2, 0, 1] = backward  # backward dp -> sp, node 1 -> node 0
    log_A[3, 0, 1] = backward - 0.2  # backward dp -> ii
    return log_A


def test_two_nodes_by_hand():
    x0 = STATE
    x1 = [-0.3, 2.0, 1.1, -4.0, -0.6, 0.5, 0.9, -1.5]
    u = (0.4, -0.2)
    log_S = (0.1, -0.2)
    fwd, bwd = 0.5, -0.25
    # what node 1 receives from node 0's superficial pyramidal cells, and node 0 from
    # node 1's deep pyramidal cells
    sp0 = spm_firing(x0[2], log_S[0])
    dp1 = spm_firing(x1[6], log_S[1])
    to_1 = (200 * math.exp(fwd) * sp0, 100 * math.exp(fwd + 0.3) * sp0, 0.0, 0.0)
    to_0 = (0.0, 0.0, 200 * math.exp(bwd) * dp1, 100 * math.exp(bwd - 0.2) * dp1)
    expected = [
        spm_flow(x0, u[0], log_S=log_S[0], ext=to_0),
        spm_flow(x1, u[1], log_S=log_S[1], ext=to_1),
    ]
    got = cmc_network_dynamics(t64([x0, x1]), t64(u), two_node_log_A(fwd, bwd), log_S=t64(log_S))
    torch.testing.assert_close(got, t64(expected), rtol=1e-12, atol=1e-9)
    # the extrinsic terms matter: without them each node is a lone column
    lone = cmc_network_dynamics(t64([x0, x1]), t64(u), log_S=t64(log_S))
    torch.testing.assert_close(lone[1], cmc_dynamics(t64(x1), u[1], log_S=t64(log_S[1])))
    assert not torch.allclose(lone, got)


def test_reciprocal_links_are_divided_by_five():
    # forward sp -> ss both ways between two nodes: SPM treats it as lateral, / 5
    x = t64([[0.0, 0.0, 1.5, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -0.5, 0.0, 0.0, 0.0, 0, 0]])
    log_A = torch.full((4, 2, 2), float("-inf"), dtype=torch.float64)
    log_A[0, 1, 0] = 0.0
    log_A[0, 0, 1] = 0.0
    got = cmc_network_dynamics(x, 0.0, log_A)
    for target, source in ((0, 1), (1, 0)):
        ext = (200.0 / 5 * spm_firing(x[source, 2].item()), 0.0, 0.0, 0.0)
        expected = spm_flow(x[target].tolist(), 0.0, ext=ext)
        torch.testing.assert_close(got[target], t64(expected), rtol=1e-12, atol=1e-9)
    # one way only: full strength
    log_A[0, 0, 1] = float("-inf")
    one_way = cmc_network_dynamics(x, 0.0, log_A)
    ext = (200.0 * spm_firing(x[0, 2].item()), 0.0, 0.0, 0.0)
    torch.testing.assert_close(one_way[1], t64(spm_flow(x[1].tolist(), 0.0, ext=ext)))


def test_gradcheck_network():
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    u = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    log_A = (0.1 * torch.randn(4, 3, 3, dtype=torch.float64)).requires_grad_()
    log_T = (0.1 * torch.randn(3, 4, dtype=torch.float64)).requires_grad_()
    log_S = (0.1 * torch.randn(3, dtype=torch.float64)).requires_grad_()

    def scaled(*args):
        return cmc_network_dynamics(*args[:3], log_T=args[3], log_S=args[4]) * 1e-4

    assert torch.autograd.gradcheck(scaled, (x, u, log_A, log_T, log_S))


# -- (c) bad inputs -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: cmc_dynamics(torch.zeros(3, 7), 0.0), ValueError, r"x must have shape"),
        (lambda: cmc_dynamics(torch.zeros(8, dtype=torch.long), 0.0), TypeError, "floating"),
        (lambda: cmc_dynamics([0.0] * 8, 0.0), TypeError, "x must be a torch.Tensor"),
        (lambda: cmc_dynamics(torch.zeros(8), "1"), TypeError, "u must be"),
        (
            lambda: cmc_dynamics(torch.zeros(8), torch.zeros((), dtype=torch.float64)),
            TypeError,
            "u has dtype torch.float64 but x has torch.float32",
        ),
        (lambda: cmc_dynamics(torch.zeros(8), 0.0, log_T=torch.zeros(3)), ValueError, "log_T"),
        (lambda: cmc_dynamics(torch.zeros(8), 0.0, log_G=torch.zeros(10)), ValueError, "log_G"),
        (
            lambda: cmc_dynamics(torch.zeros(8), 0.0, log_S=torch.zeros(1, dtype=torch.float64)),
            TypeError,
            "log_S has dtype",
        ),
        (
            lambda: cmc_dynamics(torch.zeros(2, 8), torch.zeros(3)),
            ValueError,
            "do not broadcast",
        ),
        (lambda: cmc_network_dynamics(torch.zeros(8), 0.0), ValueError, r"\(\.\.\., n, 8\)"),
        (
            lambda: cmc_network_dynamics(torch.zeros(2, 8), 0.0, torch.zeros(4, 3, 3)),
            ValueError,
            "log_A must have shape",
        ),
        (
            lambda: cmc_network_dynamics(torch.zeros(2, 8), torch.zeros(3)),
            ValueError,
            "do not broadcast",
        ),
        (
            lambda: cmc_network_dynamics(torch.zeros(1, 8), torch.zeros(3)),
            ValueError,
            "n = 1 nodes",
        ),
    ],
)
def test_bad_inputs_raise(call, error, match):
    with pytest.raises(error, match=match):
        call()


# -- (d) the trainable models on torchdiffeq --------------------------------------------

SHORT = dict(integration_time=0.03, num_readout_times=3, step_size=1e-3)


def _perturb(model: nn.Module) -> nn.Module:
    """Move the dynamics off SPM's prior, so the tests see every parameter act."""
    with torch.no_grad():
        for name, value in model.named_parameters():
            if name.startswith("log_"):
                value.add_(0.1 * torch.randn_like(value))
    return model


def test_node_exported_and_shapes():
    assert mc.CMCNode is mc.cmc.CMCNode and mc.CMCHierarchy is mc.cmc.CMCHierarchy
    model = mc.CMCNode(12, 3, num_columns=2, **SHORT)
    images = torch.randn(5, 3, 2, 2)
    assert model(images).shape == (5, 3)
    assert model.trajectory(images).shape == (4, 5, 2, 8)
    assert model.readout.in_features == 3 * 2 * 4
    names = {name for name, _ in model.named_parameters()}
    assert {"log_T", "log_G", "log_S", "log_C"} <= names
    fixed = mc.CMCNode(12, 3, learn_dynamics=False, **SHORT)
    assert "log_T" in dict(fixed.named_buffers()) and "log_T" not in dict(fixed.named_parameters())


def test_node_trajectory_is_the_integral_of_cmc_dynamics():
    # Euler by hand on the column's own equations, against torchdiffeq's Euler
    model = mc.CMCNode(4, 2, method="euler", **SHORT).double()
    _perturb(model)
    images = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        drive = model.encoder(images)
        x = torch.zeros(3, 1, 8, dtype=torch.float64)
        for _ in range(10):  # 10 steps of 1 ms to the first readout time (10 ms)
            x = x + 1e-3 * cmc_dynamics(
                x, drive, model.log_T, model.log_G, model.log_S, model.log_C
            )
        torch.testing.assert_close(model.trajectory(images)[1], x)


def test_fixed_step_and_adaptive_agree():
    fixed = mc.CMCNode(6, 3, method="rk4", **{**SHORT, "step_size": 2.5e-4}).double()
    _perturb(fixed)
    adaptive = mc.CMCNode(6, 3, method="dopri5", rtol=1e-8, atol=1e-10, **SHORT).double()
    adaptive.load_state_dict(fixed.state_dict())
    images = 3 * torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        a, b = fixed.trajectory(images), adaptive.trajectory(images)
        assert a[-1].abs().max() > 1e-3  # it moved
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * a.abs().max().item())
        torch.testing.assert_close(fixed(images), adaptive(images), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["node", "hierarchy"])
def test_adjoint_gradients_match_backprop(kind, monkeypatch):
    calls = []
    adjoint_solve = models.odeint_adjoint
    monkeypatch.setattr(
        models, "odeint_adjoint", lambda *a, **k: calls.append(1) or adjoint_solve(*a, **k)
    )
    solver = dict(method="dopri5", rtol=1e-7, atol=1e-9, integration_time=0.01)
    if kind == "node":
        build = lambda adjoint: mc.CMCNode(5, 2, num_readout_times=2, adjoint=adjoint, **solver)  # noqa: E731
    else:
        build = lambda adjoint: mc.CMCHierarchy(  # noqa: E731
            5, 2, 2, readout="all", num_readout_times=2, adjoint=adjoint, **solver
        )
    direct = _perturb(build(False).double())
    adjoint = build(True).double()
    adjoint.load_state_dict(direct.state_dict())
    images, labels = 3 * torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 1, 1])
    grads = []
    for model in (direct, adjoint):
        model.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert len(calls) == 1  # the adjoint model did take the adjoint path
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        scale = grads[0][name].abs().max().item()
        torch.testing.assert_close(
            grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6 * scale, msg=name
        )
    assert grads[0]["encoder.weight"].abs().sum() > 0 and grads[0]["log_T"].abs().sum() > 0


@pytest.mark.parametrize("kind", ["node", "hierarchy"])
def test_training_reduces_the_loss(kind):
    torch.manual_seed(1)
    images = torch.randn(32, 8)
    labels = (images @ torch.randn(8) > 0).long()  # linearly separable
    if kind == "node":
        model = mc.CMCNode(8, 2, **SHORT)
    else:
        model = mc.CMCHierarchy(8, 2, 2, readout="all", **SHORT)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-3:]) < 0.8 * losses[0], losses


def test_hierarchy_wiring():
    model = mc.CMCHierarchy(4, 2, 3, **SHORT).double()
    mask = model.extrinsic_mask
    assert mask.shape == (4, 3, 3)
    chain_up = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.bool)
    assert torch.equal(mask[0], chain_up) and torch.equal(mask[1], chain_up)
    assert torch.equal(mask[2], chain_up.T) and torch.equal(mask[3], chain_up.T)
    log_A = model.extrinsic_log_scales()
    assert torch.isinf(log_A[~mask]).all() and (log_A[mask] == 0).all()
    images = torch.randn(2, 4, dtype=torch.float64)
    traj = model.trajectory(images)
    assert traj.shape == (4, 2, 3, 8)
    assert traj[-1, :, 2].abs().max() > 0  # the image reaches the top through the chain
    model(images).sum().backward()
    # one parameter per link (4 kinds x 2 links), each trained
    assert model.log_A.shape == (8,) and (model.log_A.grad != 0).all()
    # a custom mask: no backward links
    none = torch.zeros(3, 3, dtype=torch.bool)
    custom = mc.CMCHierarchy(4, 2, 3, backward_mask=none, **SHORT)
    assert not custom.extrinsic_mask[2:].any()


def test_hierarchy_levels():
    """Levels (2, 3): the image drives both first-level nodes, every first-level node
    links forward to every second-level node and back; each link kind into a node starts
    at one prior link's strength in total (log-scale -log fan-in)."""
    model = mc.CMCHierarchy(4, 2, (2, 3), **SHORT).double()
    assert model.num_nodes == 5 and model.encoder.out_features == 2
    up = torch.zeros(5, 5, dtype=torch.bool)
    up[2:, :2] = True
    mask = model.extrinsic_mask
    assert torch.equal(mask[0], up) and torch.equal(mask[1], up)
    assert torch.equal(mask[2], up.T) and torch.equal(mask[3], up.T)
    strengths = model.extrinsic_log_scales().exp()  # exp(-inf) = 0 where no link
    assert torch.allclose(strengths[:2, 2:].sum(-1), torch.ones(2, 3, dtype=torch.float64))
    assert torch.allclose(strengths[2:, :2].sum(-1), torch.ones(2, 2, dtype=torch.float64))
    log_A = model.extrinsic_log_scales()
    assert torch.allclose(log_A[0, 2, 0], torch.tensor(-math.log(2), dtype=torch.float64))
    assert torch.allclose(log_A[2, 0, 2], torch.tensor(-math.log(3), dtype=torch.float64))
    assert model.log_A.numel() == 4 * 2 * 3  # only the links are parameters
    # the readout of the top level sees its 3 nodes' 4 voltages at each readout time
    assert model.readout.in_features == SHORT["num_readout_times"] * 3 * 4
    images = torch.randn(2, 4, dtype=torch.float64)
    # only the first level is driven: at the first step of the solver the second level's
    # state is still at rest, while the first level moved
    traj = model.trajectory(images, torch.tensor([0.0, SHORT["step_size"]], dtype=torch.float64))
    first, second = traj[1, :, :2].abs().amax(), traj[1, :, 2:].abs().amax()
    assert first > 0 and second < first
    assert model(images).shape == (2, 2)
    torch.manual_seed(0)
    chain = mc.CMCHierarchy(4, 2, 3, **SHORT)
    torch.manual_seed(0)
    as_levels = mc.CMCHierarchy(4, 2, (1, 1, 1), **SHORT)
    images = torch.randn(3, 4)
    assert torch.equal(chain(images), as_levels(images))


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: mc.CMCNode(4, 2, method="rk45"), ValueError, "method must be one of"),
        (lambda: mc.CMCNode(4, 2, step_size=None), ValueError, "give step_size"),
        (lambda: mc.CMCNode(4, 2, integration_time=0.0), ValueError, "integration_time"),
        (lambda: mc.CMCNode(4, 2, num_columns=0), ValueError, "num_columns"),
        (lambda: mc.CMCNode(4, 2, adjoint=1), TypeError, "adjoint"),
        (lambda: mc.CMCHierarchy(4, 2, 1), ValueError, "num_nodes must be >= 2"),
        (lambda: mc.CMCHierarchy(4, 2, (3,)), ValueError, "at least 2 levels"),
        (lambda: mc.CMCHierarchy(4, 2, (3, 0)), ValueError, "level's size"),
        (lambda: mc.CMCHierarchy(4, 2, "2"), TypeError, "sequence of level sizes"),
        (lambda: mc.CMCHierarchy(4, 2, readout="last"), ValueError, "readout must be one of"),
        (
            lambda: mc.CMCHierarchy(4, 2, 3, forward_mask=torch.ones(2, 2, dtype=torch.bool)),
            ValueError,
            r"forward_mask must have shape \(3, 3\)",
        ),
        (
            lambda: mc.CMCHierarchy(4, 2, 2, backward_mask=torch.ones(2, 2)),
            TypeError,
            "bool",
        ),
    ],
)
def test_bad_model_arguments_raise(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_bad_images_raise():
    model = mc.CMCNode(4, 2, **SHORT)
    with pytest.raises(ValueError, match="input_size = 4"):
        model(torch.randn(3, 5))
    with pytest.raises(TypeError, match="dtype"):
        model(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        model([[0.0] * 4])
