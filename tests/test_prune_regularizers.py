"""Channel gates (eq 13-15) and the regularisers (eq 10-12, eq 16)."""
import math

import pytest
import torch
import torch.nn as nn

import hybridops as ho
from hybridops.losses import prune_loss, quant_loss


# ----------------------------------------------------------------------------- ChannelGate
def test_gate_eval_mask_is_threshold_on_probability():
    g = ho.ChannelGate(6, threshold=0.3)
    with torch.no_grad():
        g.logits.copy_(torch.tensor([-3.0, -0.9, -0.8, 0.0, 0.5, 4.0]))
    g.eval()
    expect = torch.sigmoid(g.logits) >= 0.3  # sigmoid(-0.9) = 0.289 < 0.3 <= sigmoid(-0.8) = 0.310
    assert expect.tolist() == [False, False, True, True, True, True]
    assert torch.equal(g.kept_mask(), expect)
    assert torch.equal(g(), expect.float())
    assert g.kept_indices().tolist() == [2, 3, 4, 5]
    assert g.noise is None
    # eval-mode L_prune is the noise-free sum(b)
    torch.testing.assert_close(g.relaxed_mask(), torch.sigmoid(g.logits))


def test_gate_initial_kept_mask():
    keep = torch.tensor([True, False, True, False])
    g = ho.ChannelGate(4, kept_mask=keep, init_logit=2.5)
    assert g.logits.tolist() == [2.5, -2.5, 2.5, -2.5]
    assert torch.equal(g.kept_mask(), keep)
    assert g.channels == 4


def test_gate_training_mask_is_binary_with_straight_through_gradient():
    torch.manual_seed(0)
    g = ho.ChannelGate(64, tau=0.7)
    with torch.no_grad():
        g.logits.copy_(torch.linspace(-3, 3, 64))
    g.train()
    m = g()
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    m_bar = g.relaxed_mask().detach()
    assert m_bar is not None and bool(((m_bar > 0) & (m_bar < 1)).all())
    assert torch.equal(m, torch.round(m_bar))
    w = torch.randn(64)
    (m * w).sum().backward()
    # straight-through: dM/dM_bar = 1, so dL/dlogit = w * sigmoid'(z) / tau = w * M_bar (1 - M_bar) / tau
    torch.testing.assert_close(g.logits.grad, w * m_bar.detach() * (1 - m_bar.detach()) / 0.7)


def test_gate_sampling_follows_probabilities():
    # P(M = 1) = P(sigmoid((logit + g - g') / tau) >= 0.5) = P(logistic noise > -logit) = b
    torch.manual_seed(0)
    g = ho.ChannelGate(3, tau=0.5)
    with torch.no_grad():
        g.logits.copy_(torch.tensor([-1.0, 0.0, 2.0]))
    g.train()
    freq = torch.stack([g().detach() for _ in range(2000)]).mean(0)
    torch.testing.assert_close(freq, torch.sigmoid(g.logits.detach()), atol=0.04, rtol=0)


def test_gate_frozen_is_deterministic():
    g = ho.ChannelGate(5, kept_mask=torch.tensor([1, 0, 1, 0, 1], dtype=torch.bool))
    g.train()
    g.frozen = True
    assert g().tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert g.noise is None


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan")])
def test_gate_tau_must_be_positive(tau):
    with pytest.raises(ValueError, match="temperature tau must be positive"):
        ho.ChannelGate(4, tau=tau)


def test_gate_other_bad_args():
    with pytest.raises(ValueError, match="at least one channel"):
        ho.ChannelGate(0)
    with pytest.raises(ValueError, match=r"threshold must lie in \(0, 1\)"):
        ho.ChannelGate(3, threshold=1.0)


def test_pruned_layer_masks_output_channels():
    torch.manual_seed(0)
    keep = torch.tensor([True, False, True])
    p = ho.PrunedConv2d(2, 3, 3, padding=1, kept_mask=keep)
    p.eval()
    x = torch.randn(2, 2, 5, 5)
    y = p(x)
    ref = nn.functional.conv2d(x, p.weight, p.bias, padding=1)
    torch.testing.assert_close(y[:, [0, 2]], ref[:, [0, 2]])
    assert bool((y[:, 1] == 0).all())


# ----------------------------------------------------------------------------- L_prune (eq 15)
def test_prune_loss_is_sum_of_last_soft_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    x = torch.randn(2, 3, 8, 8)
    ho.hybridize_(model, ho.HybridConfig(keep=0.5), example_inputs=x)
    model.train()
    model(x)
    gates = [m.pruned.gate for m in model.modules() if isinstance(m, (ho.HybridConv2d, ho.HybridLinear))]
    assert len(gates) == 3
    first = [g.relaxed_mask().detach().clone() for g in gates]
    model(x)  # a second forward resamples: the loss uses the latest one
    expect = sum(g.relaxed_mask().sum() for g in gates)
    assert not all(torch.equal(a, g.relaxed_mask().detach()) for a, g in zip(first, gates))
    torch.testing.assert_close(prune_loss(model), expect)
    # the gradient of L_prune reaches the gate logits
    prune_loss(model).backward()
    assert all(g.logits.grad is not None and bool((g.logits.grad > 0).all()) for g in gates)
    # eval mode: sum of probabilities
    model.eval()
    model(x)
    torch.testing.assert_close(prune_loss(model), sum(torch.sigmoid(g.logits).sum() for g in gates))


def test_prune_loss_target_keep_charges_only_channels_over_the_budget():
    gate_a, gate_b = ho.ChannelGate(8), ho.ChannelGate(4)
    with torch.no_grad():
        gate_a.logits.copy_(torch.tensor([9.0, 8.0, 9.5, 8.5, 7.0, 7.5, -9.0, -9.0]))  # ~6 of 8 kept
        gate_b.logits.fill_(-9.0)  # ~0 of 4 kept
    model = nn.ModuleList([ho.PrunedLinear(2, 8), ho.PrunedLinear(2, 4)])
    model[0].gate, model[1].gate = gate_a, gate_b
    model.eval()
    # budget 0.5: layer a's 4 largest logits are free, the kept 7.0 and 7.5 pay; layer b is under budget
    torch.testing.assert_close(prune_loss(model, target_keep=0.5), torch.tensor(2.0), atol=2e-3, rtol=0)
    torch.testing.assert_close(prune_loss(model), torch.tensor(6.0), atol=2e-3, rtol=0)
    prune_loss(model, target_keep=0.5).backward()
    grad = gate_a.logits.grad
    assert bool((grad[:4] == 0).all()) and bool((grad[4:] > 0).all())
    assert prune_loss(model, target_keep=0.0).item() == pytest.approx(6.0, abs=2e-3)
    assert prune_loss(model, target_keep=1.0).item() == 0.0
    for bad in (-0.1, 1.5, "half"):
        with pytest.raises(ValueError, match="target_keep"):
            prune_loss(model, target_keep=bad)


def test_output_layer_gate_is_not_prunable():
    """PruneConfig.keep_output_layer: a classifier's classes are never pruned, whatever L_prune does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    ho.hybridize_(model, ho.PruneConfig(keep=0.5))
    head, hidden = model[2].gate, model[0].gate
    assert not head.prunable and hidden.prunable
    model.train()
    model(torch.randn(4, 6))
    assert head.noise is None and hidden.noise is not None  # the head is not sampled
    with torch.no_grad():
        head.logits.fill_(-5.0)
    assert bool(head.kept_mask().all())
    prune_loss(model).backward()
    assert head.logits.grad is None  # left out of L_prune
    # the flag is state: it survives a state_dict round trip
    other = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    ho.hybridize_(other, ho.PruneConfig(keep=0.5, keep_output_layer=False))
    assert other[2].gate.prunable
    other.load_state_dict(model.state_dict())
    assert not other[2].gate.prunable


# ----------------------------------------------------------------------------- L_quant (eq 11-12)
def _tiny_quant_linear(quantize_input):
    q = ho.QuantLinear(2, 1, bias=False, quantize_input=quantize_input)
    with torch.no_grad():
        q.weight.copy_(torch.tensor([[0.2, -0.6]]))
        q.wq.c.fill_(0.5)
        q.wq.log_d.fill_(math.log(0.25))  # alpha_W = 2, beta_W = -0.5
    q.normalize = True
    q.reg_targets = (0.5, 0.25)
    return q


def test_eq11_hand_computed():
    q = _tiny_quant_linear(quantize_input=False)
    # v = 2 |W| - 0.5 = [-0.1, 0.7]; avg 0.3; std (unbiased) sqrt(0.32)
    expect = (0.3 - 0.5) ** 2 + (math.sqrt(0.32) - 0.25) ** 2
    loss = quant_loss(q)
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    loss.backward()
    assert q.weight.grad is not None and q.wq.c.grad is not None and q.wq.log_d.grad is not None
    # d/dc of eq 11: v = alpha|W| + 0.5 - c alpha, so dv/dc = -alpha = -2 for every element:
    # d/dc = 2 (avg - mu0)(-2) + 2 (std - sigma0) * 0 = -4 * (0.3 - 0.5) = 0.8
    assert q.wq.c.grad.item() == pytest.approx(0.8, rel=1e-5)


def test_eq11_disabled_without_normalize():
    q = _tiny_quant_linear(quantize_input=False)
    q.normalize = False
    assert quant_loss(q).item() == 0.0


# c_A = 1, d_A = 0.5: c_A + d_A = 1.5, mu_i = c_A - d_A = 0.5, sigma_i = d_A / 2 = 0.25
@pytest.mark.parametrize("avg,std,expect,active", [
    (0.8, 0.3, 0.0, (False, False, False)),
    (0.8, 0.5, 0.3, (True, False, False)),     # avg + 2 std = 1.8 > 1.5
    (0.8, 0.1, 0.15, (False, True, False)),    # std 0.1 < sigma_i 0.25
    (0.2, 0.3, 0.3, (False, False, True)),     # avg 0.2 < mu_i 0.5
    (0.2, 0.1, 0.45, (False, True, True)),
    (0.4, 0.6, 0.1 + 0.1, (True, False, True)),  # 1.6 - 1.5 and 0.5 - 0.4
])
def test_eq12_hinge_terms(avg, std, expect, active):
    q = _tiny_quant_linear(quantize_input=True)
    with torch.no_grad():
        q.aq.c.fill_(1.0)
        q.aq.log_d.fill_(math.log(0.5))
    base = quant_loss(q).item()  # eq 11 only: no activation statistics yet
    q.act_stats = (torch.tensor(avg, requires_grad=True), torch.tensor(std, requires_grad=True))
    loss = quant_loss(q)
    assert loss.item() - base == pytest.approx(expect, abs=1e-6)
    loss.backward()
    # gradient to c_A: -1 from the first hinge, +1 from the third (mu_i = c - d)
    expect_dc = -float(active[0]) + float(active[2])
    assert q.aq.c.grad.item() == pytest.approx(expect_dc, abs=1e-6)
    # gradient to d_A (chain through log d: dd/dlog_d = d = 0.5): -1, +1/2, -1 per active hinge
    expect_dd = (-1.0 * active[0] + 0.5 * active[1] - 1.0 * active[2]) * 0.5
    assert q.aq.log_d.grad.item() == pytest.approx(expect_dd, abs=1e-6)
    assert q.act_stats[0].grad.item() == pytest.approx(float(active[0]) - float(active[2]), abs=1e-6)


def test_act_stats_recorded_in_training_forward_only():
    torch.manual_seed(0)
    q = ho.QuantConv2d(3, 4, 3)
    q.normalize = True
    x = torch.rand(2, 3, 6, 6) + 0.2
    q.calibrate(x)
    q.eval()
    q(x)
    assert q.act_stats is None
    q.train()
    q(x)
    torch.testing.assert_close(q.act_stats[0], x.mean())
    torch.testing.assert_close(q.act_stats[1], x.std())


def test_regularization_combines_eq16_terms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.randn(2, 3, 8, 8)
    ho.hybridize_(model, ho.HybridConfig(keep=0.5), example_inputs=x)
    model.train()
    model(x)
    r = ho.regularization(model, lambda_quant=0.3, lambda_prune=0.02)
    torch.testing.assert_close(r, 0.3 * quant_loss(model) + 0.02 * prune_loss(model))
    assert quant_loss(model).item() > 0 and prune_loss(model).item() > 0
    # a model without hybrid layers has zero regularisation
    assert ho.regularization(nn.Sequential(nn.ReLU())).item() == 0.0


def test_eq11_default_targets_are_the_calibrated_weights_own():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    ho.hybridize_(model, ho.QuantConfig(bits_w=3, bits_a=3))
    assert quant_loss(model).item() == 0.0  # not calibrated yet: left out
    ho.calibrate_(model, torch.randn(2, 3, 10, 10))
    model.eval()  # no activation statistics: eq 11 alone
    assert quant_loss(model).item() == pytest.approx(0.0, abs=1e-10)  # at its targets
    layer = model[2]
    mu, sd = layer.norm_targets()
    q = layer.wq.qparams().detach()
    v = q[0] * layer.weight.detach().abs() + q[1]
    assert float(mu) == pytest.approx(float(v.mean()), rel=1e-6) and float(sd) == pytest.approx(float(v.std()), rel=1e-6)
    with torch.no_grad():
        layer.weight.mul_(1.5)  # drift away from calibration: the loss pulls back
    assert quant_loss(model).item() > 1e-4
    # fixed targets (the paper's form) are still available
    fixed = nn.Sequential(nn.Conv2d(3, 8, 3))
    ho.hybridize_(fixed, ho.QuantConfig(mu0=0.5, sigma0=0.25), example_inputs=torch.randn(2, 3, 10, 10))
    assert [float(t) for t in fixed[0].norm_targets()] == [0.5, 0.25]
    # the calibrated targets are state
    clone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    ho.hybridize_(clone, ho.QuantConfig(bits_w=3, bits_a=3))
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(clone[2].calibrated_norm_stats, layer.calibrated_norm_stats)
