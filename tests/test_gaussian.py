"""reparameterize, gaussian_kl, reparameterize_kl on the reference backend: closed forms, gradients, errors."""
import math

import pytest
import torch

import vaekernels as vk
from vaekernels import eager
from vaekernels.reference import philox

from .conftest import gpu

REDUCTIONS = ["none", "sum", "mean", "batchmean", "per_sample"]


def _pair(shape=(6, 5), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g, dtype=dtype).requires_grad_()
    logvar = (0.5 * torch.randn(shape, generator=g, dtype=dtype)).requires_grad_()
    return mu, logvar


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("prior", ["none", "full", "broadcast", "mu_only"])
def test_kl_matches_closed_form_and_gradcheck(reduction, prior):
    mu, lv = _pair((4, 3, 2))
    pmu = plv = None
    if prior == "full":
        pmu, plv = _pair((4, 3, 2), seed=1)
    elif prior == "broadcast":
        pmu, plv = _pair((3, 2), seed=2)
    elif prior == "mu_only":
        pmu, _ = _pair((4, 3, 2), seed=3)
    args = tuple(t for t in (mu, lv, pmu, plv) if t is not None)

    def f(*a):
        it = iter(a)
        m, l = next(it), next(it)
        p = next(it) if pmu is not None else None
        q = next(it) if plv is not None else None
        return vk.gaussian_kl(m, l, p, q, reduction=reduction)

    expected = eager.gaussian_kl(mu, lv, pmu, plv, reduction=reduction)
    torch.testing.assert_close(f(*args), expected)
    assert torch.autograd.gradcheck(f, args)


def test_kl_elementwise_formula_by_hand():
    mu = torch.tensor([[0.0, 1.0], [-2.0, 0.5]], dtype=torch.float64)
    lv = torch.tensor([[0.0, 0.0], [math.log(4.0), -1.0]], dtype=torch.float64)
    expected = 0.5 * (lv.exp() + mu**2 - 1 - lv)
    torch.testing.assert_close(vk.gaussian_kl(mu, lv, reduction="none"), expected)
    assert vk.gaussian_kl(mu, lv, reduction="none")[0, 0].item() == 0.0  # KL(N(0,1) || N(0,1)) = 0
    torch.testing.assert_close(vk.gaussian_kl(mu, lv), expected.sum() / 2)
    torch.testing.assert_close(vk.gaussian_kl(mu, lv, mu, lv, reduction="sum"), torch.tensor(0.0, dtype=torch.float64))


def test_free_bits_clamps_per_latent_batch_mean():
    mu, lv = _pair((8, 6))
    lam = 0.6
    kl = 0.5 * (lv.exp() + mu**2 - 1 - lv)
    expected = torch.clamp(kl.mean(0), min=lam).sum()
    torch.testing.assert_close(vk.gaussian_kl(mu, lv, free_bits=lam), expected)
    assert torch.autograd.gradcheck(lambda m, l: vk.gaussian_kl(m, l, free_bits=lam), (mu, lv))
    # latents below the floor get no gradient
    vk.gaussian_kl(mu, lv, free_bits=lam).backward()
    below = kl.mean(0) < lam
    assert below.any() and (~below).any()
    assert (mu.grad[:, below] == 0).all() and (mu.grad[:, ~below] != 0).all()


def test_reparameterize_formula_and_backward():
    """On CPU tensors eps is torch.randn from a CPU generator seeded with the op's seed (drawn from torch's)."""
    mu, lv = _pair((5, 7))
    torch.manual_seed(3)
    seed = philox.draw_seed(mu.device)
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(int(seed)), dtype=mu.dtype)
    torch.manual_seed(3)
    z = vk.reparameterize(mu, lv)
    torch.testing.assert_close(z, mu + torch.exp(0.5 * lv) * eps, atol=1e-6, rtol=1e-6)
    dz = torch.randn_like(z)
    dmu, dlv = torch.autograd.grad(z, (mu, lv), dz)
    torch.testing.assert_close(dmu, dz)
    torch.testing.assert_close(dlv, 0.5 * dz * (z - mu).detach(), atol=1e-6, rtol=1e-6)
    gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    assert torch.autograd.gradcheck(lambda m, l: vk.reparameterize(m, l, generator=gen()), (mu, lv))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reparameterize_kl_gradcheck(reduction):
    """The fused sample + KL: float64 gradcheck of both outputs (the sample's noise fixed by a generator)."""
    mu, lv = _pair((4, 3, 2))
    gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731

    def f(m, l):
        z, kl = vk.reparameterize_kl(m, l, reduction=reduction, generator=gen())
        return z, kl

    assert torch.autograd.gradcheck(f, (mu, lv))
    torch.manual_seed(0)
    z, kl = vk.reparameterize_kl(mu, lv, reduction=reduction)
    torch.testing.assert_close(kl, eager.gaussian_kl(mu, lv, reduction=reduction))


def test_reparameterize_seeding():
    mu, lv = torch.zeros(1000), torch.zeros(1000)
    torch.manual_seed(0)
    a = vk.reparameterize(mu, lv)
    b = vk.reparameterize(mu, lv)
    torch.manual_seed(0)
    c = vk.reparameterize(mu, lv)
    assert not torch.equal(a, b), "each call must draw fresh noise"
    assert torch.equal(a, c), "the same torch.manual_seed must give the same z"
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(vk.reparameterize(mu, lv, generator=g1), vk.reparameterize(mu, lv, generator=g2))


def test_reparameterize_statistics():
    n = 200_000
    mu = torch.full((n,), 1.5)
    lv = torch.full((n,), math.log(4.0))  # sigma = 2
    z = vk.reparameterize(mu, lv)
    assert abs(z.mean().item() - 1.5) < 0.03
    assert abs(z.std().item() - 2.0) < 0.03
    eps = (z - 1.5) / 2
    assert abs((eps**3).mean().item()) < 0.05 and abs((eps**4).mean().item() - 3.0) < 0.1


def test_backward_saves_no_eps():
    """Autograd keeps mu, logvar, the 0-d seed and (CPU tensors) the output z: never eps."""
    mu, lv = torch.randn(64, 32, requires_grad=True), torch.randn(64, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        z, kl = vk.reparameterize_kl(mu, lv)
    big = [t for t in saved if t.numel() == mu.numel()]
    assert all(t.data_ptr() in (mu.data_ptr(), lv.data_ptr(), z.data_ptr()) for t in big)
    assert sum(t.numel() for t in saved) <= 3 * mu.numel() + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cpu_sampling_is_standard_normal_fresh_and_reproducible(dtype):
    """CPU tensors sample with torch's generator: N(0, 1), fresh noise each call, reproduced by
    torch.manual_seed and by generator=, and the gradient equals 0.5 * dz * sigma * eps (z - mu in float32/64,
    eps drawn again in float16/bfloat16)."""
    n = 100_000
    mu = torch.zeros(n, dtype=dtype, requires_grad=True)
    lv = torch.full((n,), math.log(0.25), dtype=dtype, requires_grad=True)  # sigma = 0.5
    torch.manual_seed(7)
    z1, _ = vk.reparameterize_kl(mu, lv)
    z2, _ = vk.reparameterize_kl(mu, lv)
    torch.manual_seed(7)
    z3, _ = vk.reparameterize_kl(mu, lv)
    assert torch.equal(z1, z3) and not torch.equal(z1, z2)
    eps = z1.double() / 0.5
    assert abs(eps.mean().item()) < 0.02 and abs(eps.std().item() - 1.0) < 0.02
    assert abs((eps.abs() < 1).double().mean().item() - 0.6827) < 0.01  # the normal's mass within one sigma
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    za = vk.reparameterize(mu, lv, generator=g1)
    assert torch.equal(za, vk.reparameterize(mu, lv, generator=g2))
    dz = torch.randn(n, dtype=dtype)
    (dlv,) = torch.autograd.grad(za, lv, dz)
    tol = 1e-6 if dtype in (torch.float32, torch.float64) else 1e-2
    torch.testing.assert_close(dlv.double(), 0.5 * dz.double() * za.double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reparameterize_kl_equals_separate_ops(reduction):
    mu, lv = _pair((6, 4))
    torch.manual_seed(7)
    z, kl = vk.reparameterize_kl(mu, lv, reduction=reduction)
    torch.manual_seed(7)
    z2 = vk.reparameterize(mu, lv)
    torch.testing.assert_close(z, z2)
    torch.testing.assert_close(kl, vk.gaussian_kl(mu, lv, reduction=reduction))
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    assert torch.autograd.gradcheck(
        lambda m, l: tuple(vk.reparameterize_kl(m, l, reduction=reduction, generator=gen())), (mu, lv))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_dtypes(dtype):
    mu, lv = _pair((16, 8), dtype=torch.float32)
    m, l = mu.detach().to(dtype), lv.detach().to(dtype)
    kl = vk.gaussian_kl(m, l, reduction="none")
    assert kl.dtype == dtype
    torch.testing.assert_close(kl.float(), eager.gaussian_kl(m.float(), l.float(), reduction="none"),
                               atol=1e-2, rtol=1e-2)
    z, total = vk.reparameterize_kl(m, l)
    assert z.dtype == dtype and total.dtype == dtype and torch.isfinite(z).all()


def test_empty_batches():
    mu = torch.zeros(0, 4, requires_grad=True)
    assert vk.reparameterize(mu, mu).shape == (0, 4)
    assert vk.gaussian_kl(mu, mu, reduction="none").shape == (0, 4)
    assert vk.gaussian_kl(mu, mu, reduction="sum").item() == 0.0
    z, kl = vk.reparameterize_kl(mu, mu, reduction="sum")
    assert z.shape == (0, 4) and kl.item() == 0.0


def test_nan_propagates():
    mu = torch.tensor([[0.0, float("nan")]])
    assert torch.isnan(vk.gaussian_kl(mu, torch.zeros_like(mu), reduction="none")[0, 1])
    assert torch.isnan(vk.reparameterize(mu, torch.zeros_like(mu))[0, 1])


@pytest.mark.parametrize("call, exc, words", [
    (lambda: vk.gaussian_kl(torch.zeros(3, 2), torch.zeros(3, 3)), ValueError, "logvar must have the same shape"),
    (lambda: vk.gaussian_kl(torch.zeros(3, dtype=torch.long), torch.zeros(3)), TypeError, "mu must be a floating"),
    (lambda: vk.gaussian_kl(torch.zeros(3), torch.zeros(3), reduction="avg"), ValueError, "reduction must be one of"),
    (lambda: vk.gaussian_kl(torch.zeros(3), torch.zeros(3), reduction="sum", free_bits=0.1), ValueError,
     "free_bits > 0 needs reduction='batchmean'"),
    (lambda: vk.gaussian_kl(torch.zeros(3), torch.zeros(3), free_bits=-1.0), ValueError, "free_bits must be >= 0"),
    (lambda: vk.gaussian_kl(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(4)), ValueError,
     "prior_mu of shape (4,) does not broadcast"),
    (lambda: vk.reparameterize([0.0], torch.zeros(1)), TypeError, "mu must be a torch.Tensor"),
    (lambda: vk.reparameterize(torch.zeros(2), torch.zeros(2, dtype=torch.float64)), TypeError,
     "logvar must have mu's dtype"),
])
def test_bad_input_errors(call, exc, words):
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        call()


@gpu
def test_cuda_seed_is_drawn_on_the_host_from_the_cuda_generator():
    """Eager calls on CUDA tensors take the seed from the CUDA generator's Philox state on the host (no launch):
    torch.manual_seed reproduces it, each call gets a new one, a CUDA generator= works alike, and a call inside
    CUDA-graph capture draws on the device. CPU twin: test_reparameterize_seeding."""
    torch.manual_seed(3)
    a, b = philox.draw_seed("cuda"), philox.draw_seed("cuda")
    torch.manual_seed(3)
    c = philox.draw_seed("cuda")
    assert a.device.type == "cpu" and int(a) == int(c) and int(a) != int(b)
    g1, g2 = torch.Generator("cuda").manual_seed(9), torch.Generator("cuda").manual_seed(9)
    assert int(philox.draw_seed("cuda", g1)) == int(philox.draw_seed("cuda", g2))
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        captured = philox.draw_seed("cuda")
    assert captured.device.type == "cuda"


def test_seed_mixing_spreads_nearby_offsets():
    """The host-drawn CUDA seed mixes (generator seed, offset): neighbours give unrelated 62-bit seeds."""
    seeds = [philox._mix(s, o) for s in (0, 1, 2**40) for o in range(0, 400, 4)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**62 for s in seeds)
    assert bin(philox._mix(0, 0) ^ philox._mix(0, 4)).count("1") > 10
