"""vk.factorized_residual_quantize against the per-level loop it replaces (project in, look up, project out,
subtract: DAC's and SNAC's ResidualVectorQuantize written out in plain PyTorch, with autograd's gradients), dtypes,
NaN, bad arguments, and what the node keeps for backward. The gradients are straight-through, not derivatives of the
piecewise-constant output, so the float64 oracle is autograd on the loop (gradcheck would test the wrong thing)."""
import pytest
import torch
import torch.nn.functional as F

import vaekernels as vk


def loop(z, codebooks, w_in, w_out, b_in, b_out, strides, depth, distance):
    """Level by level as the originals: returns quantized, indices, latents, commitment and codebook losses [Q, B]."""
    residual, quantized, indices, latents, commit, cb_loss = z, 0, [], [], [], []
    for i, (cb, s) in enumerate(zip(codebooks, strides)):
        x = F.avg_pool1d(residual, s, s) if s > 1 else residual
        e = torch.einsum("kd,bdt->bkt", w_in[i], x) + b_in[i][:, None]
        if distance == "cosine":
            idx = torch.einsum("bkt,nk->btn", F.normalize(e, dim=1), F.normalize(cb, dim=1)).argmax(-1)
        else:
            idx = torch.cdist(e.transpose(1, 2), cb.expand(e.shape[0], -1, -1)).argmin(-1)
        q = F.embedding(idx, cb).transpose(1, 2)
        commit.append(F.mse_loss(e, q.detach(), reduction="none").mean([1, 2]))
        cb_loss.append(F.mse_loss(q, e.detach(), reduction="none").mean([1, 2]))
        zq = torch.einsum("dk,bkt->bdt", w_out[i], e + (q - e).detach()) + b_out[i][:, None]
        zq = zq.repeat_interleave(s, -1) if s > 1 else zq
        quantized = quantized + zq * (i < depth).to(z.dtype)[:, None, None]
        residual = residual - zq
        indices.append(idx)
        latents.append(e)
    return quantized, indices, latents, torch.stack(commit), torch.stack(cb_loss)


def make(dims, b=3, d=12, t=8, k=10, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def p(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    return dict(z=p(b, d, t), codebooks=[p(k, c) for c in dims], w_in=[p(c, d, scale=d ** -0.5) for c in dims],
                w_out=[p(d, c, scale=0.3) for c in dims], b_in=[p(c) for c in dims], b_out=[p(d) for c in dims])


def _leaves(a):
    return [a["z"], *a["codebooks"], *a["w_in"], *a["w_out"], *a["b_in"], *a["b_out"]]


def _objective(quantized, latents, commit, cb_loss, seed=1):
    """A weighted sum of every output, so each gradient path is exercised."""
    g = torch.Generator().manual_seed(seed)
    w = lambda t: torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)  # noqa: E731
    return ((quantized * w(quantized)).sum() + sum((e * w(e)).sum() for e in latents)
            + (commit * w(commit)).sum() + (cb_loss * w(cb_loss)).sum())


def _run_op(a, strides, depth, distance):
    r = vk.factorized_residual_quantize(a["z"], a["codebooks"], a["w_in"], a["w_out"], a["b_in"], a["b_out"],
                                        strides=strides, depth=depth, distance=distance)
    return r, torch.autograd.grad(_objective(r.quantized, r.latents, r.commitment_loss, r.codebook_loss), _leaves(a))


CASES = [  # strides, code dims per level, distance: DAC (equal levels), SNAC (strided), mixed dims, l2
    ((1, 1, 1, 1), (4, 4, 4, 4), "cosine"),
    ((4, 2, 1), (3, 5, 4), "cosine"),
    ((2, 1), (4, 6), "l2"),
    ((1,), (5,), "cosine"),
]


@pytest.mark.parametrize("strides,dims,distance", CASES)
@pytest.mark.parametrize("depth", [None, "dropout"])
def test_matches_the_per_level_loop_float64(strides, dims, distance, depth):
    a = make(dims)
    n = len(strides)
    depth = torch.full((3,), n) if depth is None else torch.tensor([n, 1, max(n - 1, 0)])
    r, grads = _run_op(a, strides, depth, distance)
    want = loop(a["z"], a["codebooks"], a["w_in"], a["w_out"], a["b_in"], a["b_out"], strides, depth, distance)
    want_grads = torch.autograd.grad(_objective(want[0], want[2], want[3], want[4]), _leaves(a))
    assert all(torch.equal(got, w) for got, w in zip(r.indices, want[1]))
    torch.testing.assert_close(r.quantized, want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(list(r.latents), want[2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.commitment_loss, want[3], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.codebook_loss, want[4], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(list(grads), list(want_grads), rtol=1e-10, atol=1e-10)


def test_default_depth_sums_every_level_and_biases_default_to_zero():
    a = make((4, 4))
    r = vk.factorized_residual_quantize(a["z"], a["codebooks"], a["w_in"], a["w_out"])
    zeros = [torch.zeros(4, dtype=torch.float64)] * 2, [torch.zeros(12, dtype=torch.float64)] * 2
    want = loop(a["z"], a["codebooks"], a["w_in"], a["w_out"], *zeros, (1, 1), torch.full((3,), 2), "cosine")
    torch.testing.assert_close(r.quantized, want[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 5e-2)])
def test_low_precision_matches_the_loop_in_the_same_dtype(dtype, tol):
    a = make((4, 4, 4), b=4, d=32, t=12, k=16, dtype=dtype, seed=5)
    depth = torch.tensor([3, 1, 2, 3])
    r, grads = _run_op(a, (1, 2, 1), depth, "cosine")
    want = loop(a["z"], a["codebooks"], a["w_in"], a["w_out"], a["b_in"], a["b_out"], (1, 2, 1), depth, "cosine")
    want_grads = torch.autograd.grad(_objective(want[0], want[2], want[3], want[4]), _leaves(a))
    assert r.quantized.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert all(torch.equal(got, w) for got, w in zip(r.indices, want[1]))
    for got, w in zip([r.quantized, *grads], [want[0], *want_grads]):  # normwise: bf16 rounds every op
        assert (got.float() - w.float()).norm() <= tol * w.float().norm() + 1e-6


def test_nan_latent_gets_index_minus_one_and_nan_output_other_samples_untouched():
    a = make((4, 4), b=2, dtype=torch.float32)
    z = a["z"].detach().clone()
    z[1, :, 5] = float("nan")
    r = vk.factorized_residual_quantize(z, a["codebooks"], a["w_in"], a["w_out"], a["b_in"], a["b_out"])
    clean = vk.factorized_residual_quantize(z[:1], a["codebooks"], a["w_in"], a["w_out"], a["b_in"], a["b_out"])
    assert (r.indices[0][1, 5] == -1).item() and (r.indices[1][1, 5] == -1).item()
    assert torch.isnan(r.quantized[1, :, 5]).all() and not torch.isnan(r.quantized[1, :, :5]).any()
    assert all(torch.equal(i[:1], c) for i, c in zip(r.indices, clean.indices))
    torch.testing.assert_close(r.quantized[:1], clean.quantized)
    # the clean sample's codebook loss trains the codebooks as without the NaN sample: its rows add nothing
    got = torch.autograd.grad(r.codebook_loss[:, 0].sum(), a["codebooks"])
    want = torch.autograd.grad(clean.codebook_loss[:, 0].sum(), a["codebooks"])
    torch.testing.assert_close(got, want)


def test_backward_keeps_no_d_wide_tensor_per_level():
    """What autograd keeps of the node: z and each level's k-dim tensors, not a [B, D, T] residual per level
    (the per-level loop keeps one per level for its in-projections)."""
    a = make((8,) * 9, b=2, d=256, t=16, k=32, dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        vk.factorized_residual_quantize(a["z"], a["codebooks"], a["w_in"], a["w_out"], a["b_in"], a["b_out"])
    z_bytes = a["z"].numel() * 4
    weights = sum(w.numel() * 4 for w in a["w_in"] + a["w_out"] + a["b_out"])
    assert sum(saved) <= z_bytes + weights + 9 * 3 * 2 * 8 * 16 * 8  # z, weights, per level three [B, 8, T] tensors
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        saved.clear()
        loop(a["z"], a["codebooks"], a["w_in"], a["w_out"], a["b_in"], a["b_out"], (1,) * 9, torch.full((2,), 9),
             "cosine")
    assert sum(saved) >= 9 * z_bytes  # the loop it replaces: at least one residual per level


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.update(z=a["z"][0]), ValueError, r"z must be \[B, D, T\]"),
    (lambda a: a.update(codebooks=[]), ValueError, "codebooks must name at least one level"),
    (lambda a: a.update(w_in=a["w_in"][:1]), ValueError, "in_weights has 1 entries for 2 codebooks"),
    (lambda a: a["w_in"].__setitem__(1, a["w_in"][1].t()), ValueError, r"in_weights\[1\] must be \[4, 12\]"),
    (lambda a: a["w_out"].__setitem__(0, a["w_out"][0][:, :3]), ValueError, r"out_weights\[0\] must be \[12, 4\]"),
    (lambda a: a["b_out"].__setitem__(0, a["b_out"][0][:5]), ValueError, r"out_biases\[0\] must be \[12\]"),
    (lambda a: a.update(strides=(3, 1)), ValueError, "strides must divide z's time length 8"),
    (lambda a: a.update(strides=(0, 1)), ValueError, "strides"),
    (lambda a: a.update(depth=torch.ones(2)), ValueError, "depth must be a tensor of 3 per-sample level counts"),
    (lambda a: a.update(distance="dot"), ValueError, "distance"),
    (lambda a: a.update(z=a["z"].long()), TypeError, "z"),
])
def test_bad_arguments_name_the_argument(change, error, match):
    a = make((4, 4))
    a.update(strides=None, depth=None, distance="cosine")
    change(a)
    with pytest.raises(error, match=match):
        vk.factorized_residual_quantize(a["z"], a["codebooks"], a["w_in"], a["w_out"], a["b_in"], a["b_out"],
                                        strides=a["strides"], depth=a["depth"], distance=a["distance"])
