"""DiffusionNFT loss against hand-computed values and gradients."""
import pytest
import torch

from awm_fast.algorithms.nft import nft_loss, nft_timestep_indices, optimality_probability

f64 = torch.float64


def _rows():
    v = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=f64, requires_grad=True)
    v_old = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=f64)
    x_t = torch.ones(2, 2, dtype=f64)
    x0 = torch.tensor([[0.0, 0.0], [0.5, 0.5]], dtype=f64)
    return v, v_old, x_t, x0, torch.full((2,), 0.5, dtype=f64), torch.tensor([0.6, -0.2], dtype=f64)


def test_optimality_probability():
    a = torch.tensor([-1.0, -0.2, 0.0, 0.6, 1.0])
    torch.testing.assert_close(optimality_probability(a), torch.tensor([0.0, 0.4, 0.5, 0.8, 1.0], dtype=f64))


def test_loss_and_gradient_by_hand():
    v, v_old, x_t, x0, t, adv = _rows()
    out = nft_loss(v, v_old, x_t, x0, t, adv, nft_beta=1.0, kl_beta=0.0)
    # row 0: x0+ = x_t - t v = (0, 1), x0- = x_t - t (2 v_old - v) = (1, 0); w+- = 0.5; L+ = L- = 1; r = 0.8
    #        policy = 5 (0.8 + 0.2) / 1 = 5.
    # row 1: x0+ = x0- = (1, 1), diff (0.5, 0.5), w = 0.5, L = 0.5: policy = 5 * 0.5 = 2.5 for any r
    assert out.policy_loss.item() == pytest.approx((5.0 + 2.5) / 2)
    assert out.positive_loss.item() == pytest.approx(0.75) and out.negative_loss.item() == pytest.approx(0.75)
    out.loss.backward()
    # row 0: dL+/dv = 2 (0, 1)(-t) / w / D = (0, -1); dL-/dv = 2 (1, 0)(+t) / w / D = (1, 0);
    # 5 (0.8 (0, -1) + 0.2 (1, 0)) / 2 rows = (0.5, -2). Row 1 (r = 0.4): 5 (0.4 (-0.5, -0.5) + 0.6 (0.5, 0.5)) / 2
    torch.testing.assert_close(v.grad, torch.tensor([[0.5, -2.0], [0.25, 0.25]], dtype=f64))


def test_beta_mixes_policy_and_old():
    v, v_old, x_t, x0, t, adv = _rows()
    out = nft_loss(v, v_old, x_t, x0, t, adv, nft_beta=0.5, kl_beta=0.0)
    # row 0: v+ = 0.5 v + 0.5 v_old = (1.5, 0.5): x0+ = (0.25, 0.75), w+ = 0.5, L+ = (0.0625 + 0.5625) / 2 / 0.5
    #        v- = 1.5 v_old - 0.5 v = (0.5, 1.5): x0- = (0.75, 0.25), L- = the same = 0.625
    # row 1: L+- = 0.5.   policy = mean(5 * 0.625 / 0.5, 5 * 0.5 / 0.5) = (6.25 + 5) / 2
    assert out.policy_loss.item() == pytest.approx((6.25 + 5.0) / 2)


def test_kl_to_reference_and_weight_floor():
    v, v_old, x_t, x0, t, adv = _rows()
    v_ref = torch.zeros(2, 2, dtype=f64)
    out = nft_loss(v, v_old, x_t, x0, t, adv, kl_beta=0.01, v_ref=v_ref)
    assert out.kl.item() == pytest.approx(1.0)  # mean of (4, 0, 0, 0)
    assert out.loss.item() == pytest.approx(3.75 + 0.01)
    exact = nft_loss(v_old.clone(), v_old, x_t, x_t - 0.5 * v_old, t, adv, kl_beta=0.0)  # perfect x0: w floored
    assert exact.loss.item() == 0.0


def test_bad_inputs():
    v, v_old, x_t, x0, t, adv = _rows()
    with pytest.raises(ValueError, match="v_ref"):
        nft_loss(v, v_old, x_t, x0, t, adv, kl_beta=1e-4)
    with pytest.raises(ValueError, match="nft_beta"):
        nft_loss(v, v_old, x_t, x0, t, adv, nft_beta=0.0, kl_beta=0.0)
    with pytest.raises(ValueError, match="x0"):
        nft_loss(v, v_old, x_t, x0[:1], t, adv, kl_beta=0.0)
    with pytest.raises(ValueError, match="advantages"):
        nft_loss(v, v_old, x_t, x0, t, adv[:1], kl_beta=0.0)


def test_timestep_indices_are_a_permutation_prefix_per_sample():
    g = torch.Generator().manual_seed(0)
    idx = nft_timestep_indices(200, 10, 0.99, g)
    assert idx.shape == (200, 9) and idx.dtype == torch.int64  # official int(10 * 0.99) = 9
    assert all(len(set(row.tolist())) == 9 for row in idx) and idx.min() >= 0 and idx.max() <= 9
    left_out = [(set(range(10)) - set(row.tolist())).pop() for row in idx]
    assert set(left_out) == set(range(10))  # each sample leaves out its own timestep
    counts = torch.bincount(idx[:, 0], minlength=10)
    assert counts.min() > 5  # the first slot is uniform over the 10 timesteps too
    assert nft_timestep_indices(3, 10, 1.0, g).sort(dim=1).values.tolist() == [list(range(10))] * 3
    assert nft_timestep_indices(2, 14, 0.99, g).shape == (2, 13)
    with pytest.raises(ValueError, match="fraction"):
        nft_timestep_indices(2, 10, 1.5, g)
    with pytest.raises(ValueError, match="0 training timesteps"):
        nft_timestep_indices(2, 10, 0.05, g)
