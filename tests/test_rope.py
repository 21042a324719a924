"""RoPE: the real form equals Wan's complex formula; scores see only position differences; re-indexing."""
import math

import pytest
import torch

from runtime.rope import apply_rope, axis_pairs, grid_positions, inv_freqs, rope_cos_sin, rotate_time


def complex_rope(x, positions, head_dim):
    """Wan's rope_params/rope_apply written out with complex128 numbers, for explicit positions."""
    c = head_dim // 2
    dims = [head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6)]
    tables = []
    for axis, dim in enumerate(dims):
        omega = 1.0 / torch.pow(10000, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        ang = torch.outer(positions[:, axis].double(), omega)
        tables.append(torch.polar(torch.ones_like(ang), ang))
    table = torch.cat(tables, dim=1)                                  # [S, c]
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], c, 2))
    return torch.view_as_real(xc * table[None, :, None, :]).flatten(-2)


@pytest.mark.parametrize("head_dim", [128, 32, 12])
def test_axis_split(head_dim):
    t, h, w = axis_pairs(head_dim)
    assert t + h + w == head_dim // 2
    if head_dim == 128:
        assert (t, h, w) == (22, 21, 21)
    omega = inv_freqs(head_dim)
    assert omega[0] == 1.0 and omega[t] == 1.0 and omega[t + h] == 1.0
    assert math.isclose(float(omega[1]), 10000 ** (-1 / t), rel_tol=1e-12)


@pytest.mark.parametrize("head_dim", [128, 32])
def test_real_form_equals_complex_formula(head_dim):
    torch.manual_seed(0)
    pos = grid_positions([0, 3, 1023, 5000], (3, 4))
    x = torch.randn(2, pos.shape[0], 3, head_dim)
    out = apply_rope(x, *rope_cos_sin(pos, head_dim))
    ref = complex_rope(x, pos, head_dim)
    assert (out.double() - ref).abs().max() < 2e-5


def test_grid_positions_are_frame_major():
    pos = grid_positions([7, 8], (2, 3))
    assert pos.shape == (12, 3)
    assert pos[0].tolist() == [7, 0, 0] and pos[5].tolist() == [7, 1, 2] and pos[6].tolist() == [8, 0, 0]


def test_scores_depend_only_on_position_differences():
    torch.manual_seed(1)
    d = 128
    q, k = torch.randn(1, 6, 2, d, dtype=torch.float64), torch.randn(1, 6, 2, d, dtype=torch.float64)
    base_q, base_k = grid_positions([3], (2, 3)), grid_positions([1], (2, 3))

    def scores(shift):
        qr = apply_rope(q, *rope_cos_sin(base_q + shift, d))
        kr = apply_rope(k, *rope_cos_sin(base_k + shift, d))
        return torch.einsum("bshd,bthd->bhst", qr.double(), kr.double())

    ref = scores(torch.tensor([0, 0, 0]))
    for shift in ([10, 0, 0], [1000, 0, 0], [10 ** 6, 0, 0], [-2, 0, 0], [5, 3, 7]):
        assert (scores(torch.tensor(shift)) - ref).abs().max() < 1e-3 * ref.abs().max()


@pytest.mark.parametrize("delta", [1, -3, 25, 10 ** 4])
def test_reindex_rotates_only_time_channels(delta):
    torch.manual_seed(2)
    d = 128
    k = torch.randn(1, 6, 2, d, dtype=torch.float64)
    pos = grid_positions([4], (2, 3))
    rotated = apply_rope(k, *rope_cos_sin(pos, d))
    moved = rotate_time(rotated, delta, d)
    direct = apply_rope(k, *rope_cos_sin(pos + torch.tensor([delta, 0, 0]), d))
    assert (moved - direct).abs().max() < 1e-5
    t_channels = 2 * axis_pairs(d)[0]
    assert torch.equal(moved[..., t_channels:], rotated[..., t_channels:])
