"""vk.patch on the DAC lineage's factorised cosine quantizers (descript-audio-codec and snac), against the
installed packages: three training steps from the same random state, patched and original, then an eval call.

dac's package __init__ imports descript-audiotools (and so torchaudio): tests/audio_peers.py imports dac.nn
without it and with a stand-in for the two audiotools names dac.nn.loss imports.
"""
import pytest
import torch

import vaekernels as vk
from . import audio_peers
from .doubles.compare import OpCalls, assert_trains_the_same

DIM, BINS = 32, 64


def _dac(quantizer_dropout, n_codebooks=4):
    lib = audio_peers.load("dac")
    torch.manual_seed(1)
    return lib.ResidualVectorQuantize(input_dim=DIM, n_codebooks=n_codebooks, codebook_size=BINS, codebook_dim=8,
                                      quantizer_dropout=quantizer_dropout)


# The residual quantizers run as one node whose backward sums in another order than autograd's level-by-level
# chain, so float32 gradients agree to 1e-4 relative, not 1e-5; test_dac_float32_gradients_as_accurate_as_the_original
# shows that is rounding: against float64, both are equally close.


@pytest.mark.parametrize("quantizer_dropout", [0.0, 0.5, 1.0])
def test_dac_residual_vector_quantize(quantizer_dropout):
    """Training draws torch.randint(1, n + 1, (B,)) every forward and runs every level (masked per sample);
    eval stops after n_quantizers levels."""
    assert_trains_the_same(lambda: _dac(quantizer_dropout), lambda: torch.randn(4, DIM, 20),
                           lambda m, x: m(x, n_quantizers=2), op="nearest_code", rtol=1e-4)


@pytest.mark.parametrize("strides", [[1, 1, 1], [4, 2, 1]])
def test_snac_residual_vector_quantize(strides):
    lib = audio_peers.load("snac")

    def build():
        torch.manual_seed(1)
        return lib.ResidualVectorQuantize(input_dim=DIM, codebook_size=BINS, codebook_dim=8, vq_strides=strides)

    assert_trains_the_same(build, lambda: torch.randn(2, DIM, 24), lambda m, x: m(x), op="nearest_code", rtol=1e-4)


def _dac_step(rvq, dtype):
    """One training step of DAC's objective in `dtype`: codes and every gradient (in float64)."""
    rvq = rvq.to(dtype).train()
    torch.manual_seed(0)
    x = torch.randn(4, DIM, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    x.requires_grad_()
    out = rvq(x)
    (out[0].square().mean() + out[3] + out[4]).backward()
    return out[1], {"x": x.grad.double(), **{k: p.grad.double() for k, p in rvq.named_parameters()}}


def test_dac_float32_gradients_as_accurate_as_the_original():
    """Against the original in float64, the patched float32 step's gradients are as close as the original's own
    float32 step (normwise per tensor, within a factor of 3): the one-node backward only rounds differently."""
    codes64, exact = _dac_step(_dac(0.5), torch.float64)
    codes32, original = _dac_step(_dac(0.5), torch.float32)
    codes_vk, patched = _dac_step(vk.patch(_dac(0.5)), torch.float32)
    assert torch.equal(codes32, codes64) and torch.equal(codes_vk, codes64)
    for name, want in exact.items():
        scale = want.norm() + 1e-30
        err_original, err_patched = (original[name] - want).norm() / scale, (patched[name] - want).norm() / scale
        assert err_patched <= 3 * err_original + 1e-7, (name, err_patched.item(), err_original.item())


def test_dac_levels_with_other_projections_keep_the_package_loop():
    """A level whose in-projection is not a 1x1 convolution: the residual loop stays the package's (with a
    warning naming it), each level still runs the per-level patch, and the numbers are the original's."""
    def build():
        rvq = _dac(0.0)
        torch.manual_seed(2)
        rvq.quantizers[1].in_proj = torch.nn.Conv1d(DIM, 8, 3, padding=1)
        return rvq
    original = build().eval()
    with pytest.warns(UserWarning, match=r"quantizers\[1\] other than a VectorQuantize with 1x1 convolutions"):
        patched = vk.patch(build().eval())
    assert all(vars(q).get("_vaekernels_patched") for q in patched.quantizers)
    z = torch.randn(2, DIM, 20)
    got, want = patched(z), original(z)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])


def test_dac_from_latents_and_from_codes():
    rvq, patched = _dac(0.0).eval(), vk.patch(_dac(0.0).eval())
    latents = torch.randn(2, 4 * 8, 20)
    with OpCalls() as calls:
        got = patched.from_latents(latents)
    assert "vaekernels::nearest_code" in calls.names
    torch.testing.assert_close(got, rvq.from_latents(latents))
    torch.testing.assert_close(patched.from_codes(got[2]), rvq.from_codes(got[2]))


def test_dac_row_with_nan_gets_index_minus_one_and_nan_output():
    """NaN stays NaN: the fused search gives the row index -1 and its quantized latent is NaN; other rows as DAC."""
    rvq, patched = _dac(0.0).eval(), vk.patch(_dac(0.0).eval())
    z = torch.randn(2, DIM, 20)
    z[1, :, 7] = float("nan")
    got, want = patched(z, n_quantizers=1), rvq(z, n_quantizers=1)
    assert got[1][1, 0, 7] == -1 and torch.isnan(got[0][1, :, 7]).all()
    assert torch.equal(got[1][0], want[1][0]) and torch.equal(got[1][1, :, :7], want[1][1, :, :7])
    torch.testing.assert_close(got[0][0], want[0][0])


def test_vector_quantize_pytorch_is_not_taken_for_dac():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    audio_peers.load("dac")
    from vaekernels.patch import dac

    assert not any(a.is_target(vqp.VectorQuantize) for a in dac.ADAPTERS)


@pytest.mark.parametrize("package", ["dac", "snac"])
def test_class_level_patch_runs_the_residual_quantizer_as_one_node(package):
    """vk.patch("dac" | "snac") patches ResidualVectorQuantize too: its output comes from one autograd node."""
    lib = audio_peers.load(package)
    klass = lib.ResidualVectorQuantize
    original = klass.forward
    sizes = dict(n_codebooks=3) if package == "dac" else dict(vq_strides=[2, 1])
    vk.patch(package)
    try:
        rvq = klass(input_dim=DIM, codebook_size=BINS, codebook_dim=8, **sizes)
        with OpCalls() as calls:
            out = rvq(torch.randn(2, DIM, 12, requires_grad=True))
        assert "vaekernels::nearest_code" in calls.names
        assert type(out[0].grad_fn).__name__ == "_FactorizedRVQBackward"
    finally:
        vk.unpatch(package)
    assert klass.forward is original


@pytest.mark.parametrize("package", ["dac", "snac"])
def test_residual_quantizer_under_autocast_computes_in_the_input_dtype(package):
    """Under torch.autocast (bfloat16 on the CPU) the patched residual quantizer trains as without it: its one node
    computes in z's dtype, where mixing autocast's products with its float32 buffers would fail."""
    lib = audio_peers.load(package)

    def build():
        torch.manual_seed(1)
        if package == "dac":
            return vk.patch(lib.ResidualVectorQuantize(input_dim=DIM, n_codebooks=3, codebook_size=BINS,
                                                       codebook_dim=8, quantizer_dropout=0.5)).train()
        return vk.patch(lib.ResidualVectorQuantize(input_dim=DIM, codebook_size=BINS, codebook_dim=8,
                                                   vq_strides=[2, 1])).train()

    def step(autocast):
        rvq, x = build(), torch.randn(2, DIM, 12, generator=torch.Generator().manual_seed(4), requires_grad=True)
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = rvq(x)
            loss = out[0].square().mean() + (out[3] + out[4] if package == "dac" else 0)
        loss.backward()
        return out[0], loss, x.grad, [p.grad for p in rvq.parameters() if p.grad is not None]

    torch.testing.assert_close(step(True), step(False))
