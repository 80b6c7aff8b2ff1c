"""nearest_code and vector_quantize on the reference backend: float64 argmin, losses, gradients, errors."""
import pytest
import torch
import torch.nn.functional as F

import vaekernels as vk
from vaekernels import eager
from vaekernels.reference import vq as ref_vq


def _data(n=50, k=17, d=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(k, d, generator=g, dtype=dtype)


def _argmin64(z, cb):
    return torch.cdist(z.double(), cb.double()).argmin(1)


@pytest.mark.parametrize("n, k, d", [(1, 1, 1), (7, 5, 3), (300, 129, 8), (64, 1000, 33)])
def test_nearest_code_equals_float64_argmin(n, k, d):
    z, cb = _data(n, k, d, dtype=torch.float32)
    assert torch.equal(vk.nearest_code(z, cb), _argmin64(z, cb))


def test_nearest_code_is_blocked(monkeypatch):
    """The reference never builds N x K: with tiny blocks the answer is unchanged."""
    z, cb = _data(200, 300, 4, dtype=torch.float32)
    expected = vk.nearest_code(z, cb)
    monkeypatch.setattr(ref_vq, "_BLOCK_ELEMENTS", 1000)
    monkeypatch.setattr(torch, "cdist", None)
    assert torch.equal(vk.nearest_code(z, cb), expected)


def test_ties_pick_lowest_index():
    cb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert vk.nearest_code(z, cb).tolist() == [0, 1, 0]


def test_nan_rows_are_not_mapped_to_a_code():
    z, cb = _data(6, 4, 3, dtype=torch.float32)
    z[2, 1] = float("nan")
    idx = vk.nearest_code(z, cb)
    assert idx[2].item() == -1 and (idx[[0, 1, 3, 4, 5]] >= 0).all()
    r = vk.vector_quantize(z, cb)
    assert r.indices[2].item() == -1 and torch.isnan(r.quantized[2]).all() and torch.isnan(r.loss)


def test_nan_rows_gradients_leave_out_the_nan_row():
    """A NaN row gets a NaN gradient and adds nothing to the codebook's: the other rows' closed forms hold."""
    z, cb = _data(7, 4, 3, dtype=torch.float32, seed=3)
    z[2, 0] = float("nan")
    z, cb = z.requires_grad_(), cb.requires_grad_()
    r = vk.vector_quantize(z, cb)
    dz, = torch.autograd.grad(r.commitment_loss, z, retain_graph=True)
    dcb, = torch.autograd.grad(r.codebook_loss, cb)
    kept = [0, 1, 3, 4, 5, 6]
    idx, e = r.indices[kept], cb.detach()[r.indices[kept]]
    assert torch.isnan(dz[2]).all()
    torch.testing.assert_close(dz[kept], 2 * (z.detach()[kept] - e) / z.numel())
    expected = torch.zeros_like(cb).index_add_(0, idx, 2 * (e - z.detach()[kept]) / z.numel())
    torch.testing.assert_close(dcb, expected)


@pytest.mark.parametrize("nan_row", [False, True])
def test_nan_free_shortcut_equals_the_masking_path(monkeypatch, nan_row):
    """On CPU tensors a batch without NaN rows skips the -1 masking: it gives what the masking path gives, bitwise."""
    z, cb = _data(40, 9, 5, dtype=torch.float32)
    if nan_row:
        z[7, 2] = float("nan")

    def run():
        zz, cc = z.clone().requires_grad_(), cb.clone().requires_grad_()
        r = vk.vector_quantize(zz, cc, estimator="rotation")
        loss = (r.quantized * torch.linspace(-1, 1, 5)).sum() + r.codebook_loss + 0.5 * r.commitment_loss
        return (r.quantized, r.indices, r.loss, r.perplexity) + torch.autograd.grad(loss, (zz, cc))

    fast = run()
    monkeypatch.setattr(ref_vq, "_no_nan_rows", lambda nan: False)
    monkeypatch.setattr(ref_vq, "_no_nan_indices", lambda idx: False)
    for a, b in zip(fast, run()):
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_cosine_distance():
    z, cb = _data(40, 9, 5, dtype=torch.float32)
    expected = (F.normalize(z, dim=1) @ F.normalize(cb, dim=1).t()).argmax(1)
    assert torch.equal(vk.nearest_code(z, cb, distance="cosine"), expected)
    r = vk.vector_quantize(z, cb, distance="cosine")
    torch.testing.assert_close(r.quantized, F.normalize(cb, dim=1)[expected])
    torch.testing.assert_close(r.codebook_loss, F.mse_loss(F.normalize(cb, dim=1)[expected], F.normalize(z, dim=1)))


def test_channel_first_layout():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 6, 5, 3, generator=g)
    cb = torch.randn(11, 6, generator=g)
    idx = vk.nearest_code(z, cb, dim=1)
    assert idx.shape == (2, 5, 3)
    assert torch.equal(idx, vk.nearest_code(z.permute(0, 2, 3, 1), cb))
    r = vk.vector_quantize(z, cb, dim=1)
    assert r.quantized.shape == z.shape and r.indices.shape == (2, 5, 3)
    torch.testing.assert_close(r.quantized, cb[idx].permute(0, 3, 1, 2))


@pytest.mark.parametrize("beta", [0.25, 1.0])
def test_losses_and_straight_through_gradients(beta):
    z, cb = _data(30, 7, 4)
    z.requires_grad_()
    cb.requires_grad_()
    r = vk.vector_quantize(z, cb, beta=beta)
    e = cb.detach()[_argmin64(z, cb)]
    mse = ((e - z.detach()) ** 2).mean()
    torch.testing.assert_close(r.codebook_loss, mse)
    torch.testing.assert_close(r.commitment_loss, mse)
    torch.testing.assert_close(r.loss, (1 + beta) * mse)
    torch.testing.assert_close(r.quantized, e)
    dq = torch.randn_like(z)
    dz, dcb = torch.autograd.grad((r.quantized * dq).sum() + r.loss, (z, cb))
    torch.testing.assert_close(dz, dq + beta * 2 * (z - e).detach() / z.numel())
    expected_dcb = torch.zeros_like(cb).index_add_(0, _argmin64(z, cb), 2 * (e - z.detach()) / z.numel())
    torch.testing.assert_close(dcb, expected_dcb)
    q2, i2, loss2 = eager.vector_quantize(z, cb, beta=beta)
    torch.testing.assert_close(r.loss, loss2)
    assert torch.equal(r.indices, i2)


def test_codebook_gets_no_gradient_from_commitment_or_quantized():
    z, cb = _data(20, 5, 3)
    z.requires_grad_()
    cb.requires_grad_()
    r = vk.vector_quantize(z, cb)
    (dcb,) = torch.autograd.grad(r.quantized.sum() + r.commitment_loss, cb, allow_unused=True)
    assert dcb is None or torch.count_nonzero(dcb) == 0


def _rotation_closed_form(dq, z, e):
    u = z / z.norm(dim=1, keepdim=True)
    q = e / e.norm(dim=1, keepdim=True)
    w = (u + q) / (u + q).norm(dim=1, keepdim=True)
    lam = e.norm(dim=1, keepdim=True) / z.norm(dim=1, keepdim=True)
    return lam * (dq - 2 * (dq * w).sum(1, keepdim=True) * w + 2 * (dq * q).sum(1, keepdim=True) * u)


def test_rotation_estimator_forward_and_gradient():
    z, cb = _data(25, 6, 5)
    z.requires_grad_()
    r = vk.vector_quantize(z, cb, estimator="rotation", beta=0.0)
    e = cb[_argmin64(z, cb)]
    torch.testing.assert_close(r.quantized, e)
    dq = torch.randn_like(z)
    (dz,) = torch.autograd.grad((r.quantized * dq).sum(), z)
    torch.testing.assert_close(dz, _rotation_closed_form(dq, z.detach(), e))
    # the rotation is orthogonal, scaled by |e| / |z|: it preserves the angle between dq and z's update
    ratio = dz.norm(dim=1) / dq.norm(dim=1)
    torch.testing.assert_close(ratio, e.norm(dim=1) / z.detach().norm(dim=1))


def test_rotation_zero_norm_row_is_finite():
    z = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    cb = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    r = vk.vector_quantize(z, cb, estimator="rotation")
    (dz,) = torch.autograd.grad(r.quantized.sum(), z)
    assert torch.isfinite(dz).all()


def test_perplexity():
    cb = torch.eye(4)
    z = torch.tensor([[1.0, 0, 0, 0]] * 2 + [[0, 1.0, 0, 0]] * 2)
    r = vk.vector_quantize(z, cb)
    torch.testing.assert_close(r.perplexity, torch.tensor(2.0))
    assert not r.perplexity.requires_grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_and_mixed_codebook(dtype):
    z, cb = _data(40, 13, 8, dtype=torch.float32)
    r = vk.vector_quantize(z.to(dtype), cb)  # low-precision latents, float32 codebook (autocast training)
    assert r.quantized.dtype == dtype and r.indices.dtype == torch.int64
    assert torch.equal(r.indices, _argmin64(z.to(dtype).float(), cb))


def test_empty_batch():
    cb = torch.randn(5, 3)
    z = torch.zeros(0, 3, requires_grad=True)
    r = vk.vector_quantize(z, cb)
    assert r.quantized.shape == (0, 3) and r.indices.shape == (0,)
    assert vk.nearest_code(z, cb).shape == (0,)


@pytest.mark.parametrize("call, exc, words", [
    (lambda: vk.nearest_code(torch.zeros(4, 3), torch.zeros(5, 2)), ValueError, "codebook has code_dim 2 but z has 3"),
    (lambda: vk.nearest_code(torch.zeros(4, 3), torch.zeros(0, 3)), ValueError, "codebook is empty"),
    (lambda: vk.nearest_code(torch.zeros(4, 3), torch.zeros(5, 3), distance="l1"), ValueError, "distance must be one"),
    (lambda: vk.nearest_code(torch.zeros(4, 3, dtype=torch.int32), torch.zeros(5, 3)), TypeError, "z must be a floating"),
    (lambda: vk.nearest_code(torch.zeros(4, 3), torch.zeros(5, 3, 1)), ValueError, "codebook must be 2-D"),
    (lambda: vk.vector_quantize(torch.zeros(4, 3), torch.zeros(5, 3), dim=2), ValueError, "dim=2 is out of range"),
    (lambda: vk.vector_quantize(torch.zeros(4, 3), torch.zeros(5, 3), estimator="gumbel"), ValueError,
     "estimator must be one of"),
    (lambda: vk.vector_quantize(torch.zeros(4, 3), torch.zeros(5, 3), precision="fp8"), ValueError,
     "precision must be one of"),
    (lambda: vk.vector_quantize(torch.zeros(4, 3), torch.zeros(5, 3), beta=-1.0), ValueError, "beta must be >= 0"),
])
def test_bad_input_errors(call, exc, words):
    with pytest.raises(exc, match=words):
        call()
