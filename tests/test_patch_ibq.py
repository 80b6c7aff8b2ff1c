"""vk.patch on SEED-Voken's IndexPropagationQuantize (a test double written from its published formulas) and on
vector-quantize-pytorch's SimVQ and ResidualSimVQ (the installed library)."""
import copy

import numpy as np
import pytest
import torch

import vaekernels as vk
from .doubles import seed_voken
from .doubles.compare import CPU_FUSED_BACKENDS, OpCalls, assert_patched_equivalent, weights_like

IBQ_CONFIGS = {
    "defaults": dict(),
    "entropy": dict(use_entropy_loss=True),
    "entropy_weights": dict(use_entropy_loss=True, entropy_temperature=0.3, sample_minimization_weight=0.4,
                            batch_maximization_weight=1.7, beta=0.6),
    "no_beta": dict(beta=0.0, entropy_temperature=0.2),
}


def _ibq_objective(out):
    """A scalar that depends on z_q and on every loss (each entropy term with its own weight)."""
    z_q, diff, _ = out
    losses = diff if isinstance(diff, tuple) else (diff,)
    return (z_q * weights_like(z_q)).sum() + sum(c * loss for c, loss in zip((1.0, 0.7, -1.3, 0.4), losses))


def _ibq_step(module, z, seed):
    torch.manual_seed(seed)
    x = z.clone().requires_grad_()
    opt = torch.optim.Adam(module.parameters(), lr=0.01)
    with OpCalls() as calls:
        out = module(x)
        _ibq_objective(out).backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    opt.step()
    with torch.no_grad():
        after = module(z)
    return dict(out=out, x_grad=x.grad, grads=grads, state=copy.deepcopy(module.state_dict()), after=after), calls.names


@pytest.mark.parametrize("name", IBQ_CONFIGS)
def test_index_propagation_quantize_equivalent(name):
    """Outputs, every loss, the gradients of z and of the codebook, one Adam step and the forward after it."""
    torch.manual_seed(0)
    original = seed_voken.IndexPropagationQuantize(64, 8, **IBQ_CONFIGS[name])
    patched = vk.patch(copy.deepcopy(original))
    assert patched._vaekernels_patched
    z = torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(1))
    want, want_ops = _ibq_step(original, z, 0)
    got, got_ops = _ibq_step(patched, z, 0)
    assert want_ops == [] and "vaekernels::ibq_fwd" in got_ops and "vaekernels::ibq_bwd" in got_ops
    assert got["out"][2][2].shape == (2 * 3 * 5,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert patched.state_dict().keys() == original.state_dict().keys()


def test_remap_keeps_the_original_code(tmp_path):
    path = tmp_path / "used.npy"
    np.save(path, np.arange(0, 16, 2))
    torch.manual_seed(0)
    q = seed_voken.IndexPropagationQuantize(16, 4, remap=str(path), unknown_index=0)
    with pytest.warns(UserWarning, match="remap"):
        patched = vk.patch(copy.deepcopy(q))
    assert not vars(patched).get("_vaekernels_patched")
    with OpCalls() as calls:
        patched(torch.randn(2, 4, 3, 3))
    assert calls.names == []


def test_class_level_patch_and_unpatch():
    torch.manual_seed(0)
    q = seed_voken.IndexPropagationQuantize(32, 4, use_entropy_loss=True)
    z = torch.randn(2, 4, 3, 3)
    want = q(z)
    vk.patch(seed_voken.IndexPropagationQuantize)
    try:
        with OpCalls() as calls:
            got = q(z)
        assert "vaekernels::ibq_fwd" in calls.names
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    finally:
        vk.unpatch(seed_voken.IndexPropagationQuantize)
    with OpCalls() as calls:
        q(z)
    assert calls.names == []


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_index_propagation_quantize_on_fused_backend(backend):
    torch.manual_seed(0)
    original = seed_voken.IndexPropagationQuantize(40, 8, use_entropy_loss=True, entropy_temperature=0.2)
    patched = vk.patch(copy.deepcopy(original))
    z = torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(1))
    want, _ = _ibq_step(original, z, 0)
    with vk.use_backend(backend):
        got, _ = _ibq_step(patched, z, 0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


vqp = pytest.importorskip("vector_quantize_pytorch")

SIMVQ_CONFIGS = {
    "defaults": dict(),
    "ste": dict(rotation_trick=False),
    "channel_first": dict(channel_first=True),
    "weights": dict(commitment_weight=0.3, input_to_quantize_commit_loss_weight=0.5),
    "frozen_dim": dict(frozen_codebook_dim=6),
}


def _simvq_input(config):
    if config.get("channel_first"):
        return lambda: torch.randn(2, 4, 3, 5)
    return lambda: torch.randn(2, 5, 4)


def _simvq_objective(out):
    quantized, _, loss = out
    return (quantized * weights_like(quantized)).sum() + loss.sum()  # ResidualSimVQ: one loss per layer


@pytest.mark.parametrize("name", SIMVQ_CONFIGS)
def test_simvq_equivalent(name):
    torch.manual_seed(0)
    sim = vqp.SimVQ(dim=4, codebook_size=16, **SIMVQ_CONFIGS[name])
    assert_patched_equivalent(sim, _simvq_input(SIMVQ_CONFIGS[name]), _simvq_objective)


@pytest.mark.parametrize("rotation_trick", [True, False])
def test_residual_simvq_equivalent(rotation_trick):
    torch.manual_seed(0)
    rsim = vqp.ResidualSimVQ(dim=4, num_quantizers=3, codebook_size=16, rotation_trick=rotation_trick)
    patched = assert_patched_equivalent(rsim, lambda: torch.randn(2, 5, 4), _simvq_objective)
    assert all(vars(layer).get("_vaekernels_patched") for layer in patched.layers)


def test_simvq_single_token_rows():
    torch.manual_seed(0)
    assert_patched_equivalent(vqp.SimVQ(dim=4, codebook_size=16), lambda: torch.randn(3, 4), _simvq_objective)


def test_simvq_float64_against_the_op():
    """SimVQ is vector_quantize on code_transform(frozen_codebook) with beta = input_to_quantize_commit_loss_weight,
    the rotation estimator, times commitment_weight: in float64, outputs and gradients of the library's forward."""
    torch.manual_seed(0)
    sim = vqp.SimVQ(dim=4, codebook_size=16, commitment_weight=0.7).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    q, ind, loss = sim(x)
    r = vk.vector_quantize(x, sim.codebook, beta=0.25, estimator="rotation")
    assert torch.equal(ind, r.indices)
    torch.testing.assert_close(r.quantized, q, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.loss * 0.7, loss, rtol=1e-12, atol=1e-12)
    w = weights_like(q)
    params = [x, *sim.parameters()]
    g1 = torch.autograd.grad((q * w).sum() + loss, params)
    g2 = torch.autograd.grad((r.quantized * w).sum() + 0.7 * r.loss, params)
    torch.testing.assert_close(g2, g1, rtol=1e-10, atol=1e-12)
