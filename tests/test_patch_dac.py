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


@pytest.mark.parametrize("quantizer_dropout", [0.0, 0.5, 1.0])
def test_dac_residual_vector_quantize(quantizer_dropout):
    """Training draws torch.randint(1, n + 1, (B,)) every forward and runs every level (masked per sample);
    eval stops after n_quantizers levels."""
    assert_trains_the_same(lambda: _dac(quantizer_dropout), lambda: torch.randn(4, DIM, 20),
                           lambda m, x: m(x, n_quantizers=2), op="nearest_code")


@pytest.mark.parametrize("strides", [[1, 1, 1], [4, 2, 1]])
def test_snac_residual_vector_quantize(strides):
    lib = audio_peers.load("snac")

    def build():
        torch.manual_seed(1)
        return lib.ResidualVectorQuantize(input_dim=DIM, codebook_size=BINS, codebook_dim=8, vq_strides=strides)

    assert_trains_the_same(build, lambda: torch.randn(2, DIM, 24), lambda m, x: m(x), op="nearest_code")


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
