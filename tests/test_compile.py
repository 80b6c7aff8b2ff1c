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
    a = list(args())
    a[0].requires_grad_()
    a[1].requires_grad_()
    torch.library.opcheck(gops.gaussian_fwd, tuple(a))


@pytest.mark.parametrize("estimator", ["ste", "rotation"])
def test_opcheck_vq(estimator):
    z, cb = _t(2, 3, 5).requires_grad_(), _t(7, 3, seed=1).requires_grad_()
    torch.library.opcheck(vops.vq_fwd, (z, cb, 1, "exact", estimator, True))
    torch.library.opcheck(vops.nearest_code_op, (z.detach(), cb.detach(), 1, "exact"))


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
