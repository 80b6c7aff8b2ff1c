"""The ops as PyTorch citizens: torch.library.opcheck and torch.compile(fullgraph=True)."""
import pytest
import torch

import vaekernels as vk
from vaekernels.ops import gaussian as gops
from vaekernels.ops import vq as vops


def _t(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("args", [
    lambda: (_t(4, 3), _t(4, 3, seed=1), None, None, torch.tensor(5), "sum", 0.25),
    lambda: (_t(4, 3), _t(4, 3, seed=1), _t(4, 3, seed=2), _t(4, 3, seed=3), None, "elementwise", 1.0),
    lambda: (_t(4, 3), _t(4, 3, seed=1), None, None, torch.tensor(5), "latent", 1.0),
    lambda: (_t(4, 3), _t(4, 3, seed=1), None, None, None, "sample", 1.0),
])
def test_opcheck_gaussian(args):
    """Schema, fake tensors and AOT dispatch of both operators (autograd lives outside them, in _Gaussian)."""
    mu, lv, pmu, plv, seed, kl_mode, scale = args()
    torch.library.opcheck(gops.gaussian_fwd.op, (mu, lv, pmu, plv, seed, kl_mode, scale))
    z, kl = gops.gaussian_fwd(mu, lv, pmu, plv, seed, kl_mode, scale)
    dz = torch.ones_like(z) if seed is not None else None
    torch.library.opcheck(gops.gaussian_bwd.op, (dz, torch.ones_like(kl), mu, lv, pmu, plv, seed,
                                                 z if seed is not None else None, kl_mode, scale))


@pytest.mark.parametrize("estimator", ["ste", "rotation"])
def test_opcheck_vq(estimator):
    z, cb = _t(2, 3, 5), _t(7, 3, seed=1)
    torch.library.opcheck(vops.vq_fwd.op, (z, cb, 1, "exact", True))
    idx = vops.nearest_code_op(z, cb, 1, "exact")
    one = torch.tensor(1.0)
    torch.library.opcheck(vops.vq_bwd.op, (torch.ones_like(z), z, cb, idx, one, one, 1, estimator))
    torch.library.opcheck(vops.nearest_code_op.op, (z, cb, 1, "exact"))


def test_compiled_graphs_keep_the_ops_opaque():
    """Under torch.compile the forward graph calls the vaekernels forward operators and the backward graph the
    backward operators, as single nodes (inductor never sees their insides)."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    backend = AotEagerAndRecordGraphs()

    def f(mu, lv, z, cb):
        zs, kl = vk.reparameterize_kl(mu, lv)
        return zs.sum() + kl + vk.vector_quantize(z, cb).loss

    args = (_t(4, 3).requires_grad_(), _t(4, 3, seed=1).requires_grad_(), _t(5, 3, seed=2).requires_grad_(),
            _t(6, 3, seed=3).requires_grad_())
    torch.compile(f, fullgraph=True, backend=backend)(*args).backward()
    forward, backward = str(backend.fw_graphs[0].code), str(backend.bw_graphs[0].code)
    assert "vaekernels.gaussian_fwd" in forward and "vaekernels.vq_fwd" in forward
    assert "vaekernels.gaussian_bwd" in backward and "vaekernels.vq_bwd" in backward


class _Bottlenecks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.vq = vk.nn.VectorQuantizer(16, 4, dim=1)
        self.post = vk.nn.DiagonalGaussian(dim=1)

    def forward(self, h):
        z, kl = self.post(h)
        out = self.vq(z)
        return out.quantized.square().mean() + out.loss + kl + vk.gaussian_kl(z, z, reduction="mean")


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = _Bottlenecks()
    h = _t(2, 8, 3, 3).requires_grad_()
    torch.manual_seed(1)
    eager_loss = model(h)
    eager_grads = torch.autograd.grad(eager_loss, (h, model.vq.codebook))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    loss = compiled(h)
    grads = torch.autograd.grad(loss, (h, model.vq.codebook))
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_compile_inductor_functional_api():
    f = torch.compile(lambda z, cb: vk.vector_quantize(z, cb, estimator="rotation").loss, fullgraph=True)
    z, cb = _t(10, 4), _t(6, 4, seed=1)
    torch.testing.assert_close(f(z, cb), vk.vector_quantize(z, cb).loss)


def test_eager_calls_skip_the_dispatcher_with_the_same_results(monkeypatch):
    """Plain eager calls run the implementation directly; under a dispatch mode (as inside torch.compile or a
    profiler) the registered operator runs; both give the same values and gradients."""
    from tests.doubles.compare import OpCalls

    def step():
        torch.manual_seed(0)
        mu, lv = _t(6, 5).requires_grad_(), _t(6, 5, seed=1).requires_grad_()
        z, cb = _t(8, 5, seed=2).requires_grad_(), _t(7, 5, seed=3).requires_grad_()
        s, kl = vk.reparameterize_kl(mu, lv)
        r = vk.vector_quantize(z, cb, estimator="rotation")
        loss = (s * s).sum() + kl + (r.quantized * z.detach()).sum() + r.loss
        return (s, kl, r.quantized, r.indices, r.loss) + torch.autograd.grad(loss, (mu, lv, z, cb))

    with OpCalls() as calls:
        dispatched = step()
    assert {"vaekernels::gaussian_fwd", "vaekernels::gaussian_bwd", "vaekernels::vq_fwd",
            "vaekernels::vq_bwd"} <= set(calls.names)

    def refuse(*args):
        raise AssertionError("an eager call went through the dispatcher")

    for op in (gops.gaussian_fwd, gops.gaussian_bwd, vops.vq_fwd, vops.vq_bwd):
        monkeypatch.setattr(op, "op", refuse)
    for a, b in zip(step(), dispatched):
        torch.testing.assert_close(a, b)


def test_compile_fullgraph_factorized_residual_quantize():
    """The residual node (an autograd.Function over the search operator) traces whole, with the same gradients."""
    from .test_rvq import _leaves, make
    a = make((4, 4, 4), dtype=torch.float32)
    depth = torch.tensor([3, 1, 2])

    def step(z, cbs, wi, wo, bi, bo):
        r = vk.factorized_residual_quantize(z, cbs, wi, wo, bi, bo, strides=(2, 1, 1), depth=depth)
        return r.quantized.square().sum() + r.commitment_loss.sum() + r.codebook_loss.sum()
    args = (a["z"], a["codebooks"], a["w_in"], a["w_out"], a["b_in"], a["b_out"])
    want = torch.autograd.grad(step(*args), _leaves(a))
    got = torch.autograd.grad(torch.compile(step, fullgraph=True, backend="aot_eager")(*args), _leaves(a))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
