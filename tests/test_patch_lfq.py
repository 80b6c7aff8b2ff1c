"""vk.patch on vector-quantize-pytorch's LFQ, ResidualLFQ and GroupedResidualLFQ against the installed library."""
import copy
import warnings

import pytest
import torch

import vaekernels as vk
from .doubles.compare import OpCalls, _step, weights_like

vqp = pytest.importorskip("vector_quantize_pytorch")
from vector_quantize_pytorch import LFQ, GroupedResidualLFQ, ResidualLFQ  # noqa: E402

CONFIGS = {
    "defaults": dict(dim=4),
    "spherical": dict(dim=4, spherical=True),
    "codebooks": dict(dim=6, num_codebooks=2, commitment_loss_weight=0.25),
    "scale_commit": dict(dim=4, codebook_scale=0.5, commitment_loss_weight=1.0, diversity_gamma=2.0),
    "projection": dict(dim=6, codebook_size=16, commitment_loss_weight=0.5),
    "spherical_codebooks": dict(dim=8, num_codebooks=2, spherical=True, codebook_scale=2.0, commitment_loss_weight=1.),
    "softplus_clamp": dict(dim=4, experimental_softplus_entropy_loss=True, soft_clamp_input_value=2.0),
    "channel_first": dict(dim=4, channel_first=True),
}


def _objective(out):
    if isinstance(out[0], tuple):  # return_loss_breakdown
        out, breakdown = out
        extra = sum(b for b in breakdown)
    else:
        extra = 0
    q, _, loss = out[:3]
    return (q * weights_like(q)).sum() + loss.sum() + extra


def _equivalent(module, make_input, call_kwargs=None, op="vaekernels::lfq_fwd"):
    patched = vk.patch(copy.deepcopy(module))
    assert any(vars(m).get("_vaekernels_patched") for m in patched.modules())
    ref, ref_ops = _step(module, make_input, _objective, 0, call_kwargs or {})
    got, got_ops = _step(patched, make_input, _objective, 0, call_kwargs or {})
    assert ref_ops == [] and op in got_ops, got_ops
    torch.testing.assert_close(got["out"], ref["out"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["x_grad"], ref["x_grad"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["grads"], ref["grads"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["state"], ref["state"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["eval_out"], ref["eval_out"])
    return patched


def _input(config):
    if config.get("channel_first"):
        return lambda: torch.randn(2, config["dim"], 3, 2)
    return lambda: torch.randn(2, 9, config["dim"]) * 0.1  # near 0: soft probabilities, large entropy gradients


@pytest.mark.parametrize("name", CONFIGS)
def test_lfq_equivalent(name):
    torch.manual_seed(0)
    _equivalent(LFQ(**CONFIGS[name]), _input(CONFIGS[name]))


def test_lfq_options_equivalent():
    torch.manual_seed(0)
    lfq = LFQ(dim=4, commitment_loss_weight=0.5)
    _equivalent(lfq, lambda: torch.randn(2, 4, 3, 3), dict(return_loss_breakdown=True, inv_temperature=10.0))
    mask = torch.tensor([[True] * 9, [True, False] * 4 + [True]])
    _equivalent(lfq, _input({"dim": 4}), dict(mask=mask))


def test_residual_and_grouped_residual_lfq_equivalent():
    torch.manual_seed(0)
    rlfq = ResidualLFQ(dim=6, num_quantizers=2, codebook_size=16)
    patched = _equivalent(rlfq, lambda: torch.randn(2, 7, 6))
    assert all(layer._vaekernels_patched for layer in patched.layers)
    grouped = GroupedResidualLFQ(dim=8, groups=2, num_quantizers=2, codebook_size=16)
    _equivalent(grouped, lambda: torch.randn(2, 7, 8))


def test_frac_per_sample_entropy_warns_once_and_is_exact():
    from vaekernels.patch import vector_quantize_pytorch_lfq as adapter

    adapter._warned_frac = False
    torch.manual_seed(0)
    lfq = LFQ(dim=4, frac_per_sample_entropy=0.5)
    full = LFQ(dim=4)
    patched = vk.patch(copy.deepcopy(lfq))
    x = torch.randn(2, 9, 4) * 0.1
    with pytest.warns(UserWarning, match="frac_per_sample_entropy"):
        got = patched(x, return_loss_breakdown=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        patched(x)  # once
    want = full(x, return_loss_breakdown=True)
    torch.testing.assert_close(got, want)


def test_uncovered_option_keeps_the_original_with_a_warning():
    lfq = LFQ(dim=4, orthogonal_rotation=True)
    with pytest.warns(UserWarning, match="orthogonal_rotation"):
        vk.patch(lfq)
    assert "forward" not in vars(lfq)


def test_class_level_patch_covers_lfq():
    vk.patch("vector_quantize_pytorch")
    try:
        lfq = LFQ(dim=4)
        with OpCalls() as calls:
            lfq(torch.randn(2, 5, 4))
        assert "vaekernels::lfq_fwd" in calls.names
    finally:
        vk.unpatch("vector_quantize_pytorch")
