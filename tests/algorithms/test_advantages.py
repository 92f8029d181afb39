import pytest
import torch

from awm_fast.algorithms.advantages import STD_EPS, count_flat_groups, group_advantages


def test_group_mean_and_global_std(gen):
    r = torch.rand(12, generator=gen, dtype=torch.float64)
    groups = torch.arange(3).repeat_interleave(4)
    adv = group_advantages(r, groups, clip_max=5.0)
    means = r.reshape(3, 4).mean(1).repeat_interleave(4)
    expected = ((r - means) / (r.std(unbiased=False) + STD_EPS)).clamp(-5, 5) / 5
    torch.testing.assert_close(adv, expected)


def test_clipping_to_unit_range():
    r = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 100.0], dtype=torch.float64)
    adv = group_advantages(r, torch.zeros(8, dtype=torch.int64), clip_max=2.0)
    assert adv.max().item() == pytest.approx(1.0)
    assert adv.min().item() >= -1.0


def test_all_equal_rewards_give_zero_advantages_without_nan():
    adv = group_advantages(torch.full((6,), 0.5), torch.arange(3).repeat_interleave(2))
    assert torch.equal(adv, torch.zeros(6, dtype=torch.float64))


def test_flat_groups_get_exactly_zero_even_when_their_mean_rounds(gen):
    # 0.1 + 0.1 + 0.1 = 0.30000000000000004: the group mean is not 0.1, yet the group carries no signal
    r = torch.cat([torch.full((3,), 0.1, dtype=torch.float64), torch.rand(3, generator=gen, dtype=torch.float64)])
    adv = group_advantages(r, torch.arange(2).repeat_interleave(3))
    assert torch.equal(adv[:3], torch.zeros(3, dtype=torch.float64)) and (adv[3:] != 0).all()


def test_groups_need_not_be_contiguous(gen):
    r = torch.rand(6, generator=gen, dtype=torch.float64)
    g = torch.tensor([1, 0, 1, 0, 1, 0])
    adv = group_advantages(r, g)
    perm = torch.tensor([1, 3, 5, 0, 2, 4])
    torch.testing.assert_close(adv[perm], group_advantages(r[perm], g[perm]))


def test_bad_rewards():
    with pytest.raises(ValueError, match="NaN or inf"):
        group_advantages(torch.tensor([1.0, float("nan"), 0.0, 1.0]), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="single sample"):
        group_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))


def test_count_flat_groups():
    r = torch.tensor([0.5, 0.5, 0.1, 0.9, 0.3, 0.3])
    assert count_flat_groups(r, torch.tensor([0, 0, 1, 1, 2, 2])) == 2
