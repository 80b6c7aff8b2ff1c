"""The Triton search at GPU scale: results independent of how the code axis is split, and fast precisions that
return exactly the indices of precision="exact" (the certified window, the canonical re-scoring and the flagged
re-search), on the interpreter here and compiled on a GPU."""
import pytest
import torch

import vaekernels as vk
from vaekernels.ops.vq import quantize_with_stats

from . import kernel_variants
from .conftest import DEVICE, FUSED_BACKENDS

pytestmark = pytest.mark.skipif("triton" not in FUSED_BACKENDS, reason="triton is not available")
tvq = pytest.importorskip("vaekernels.triton.vq")

# K = 70 codes: three 32-wide tiles on the interpreter, so 2 splits do not divide them and 5 leave splits empty
SPLITS = ["1", "2", "3", "5"]


def _run(z, cb, splits, monkeypatch, **kwargs):
    monkeypatch.setenv("VAEKERNELS_SEARCH_SPLIT", splits)
    with vk.use_backend("triton"):
        r, counts, sums, _ = quantize_with_stats(z, cb, with_sums=True, **kwargs)
        idx = vk.nearest_code(z, cb, **{k: v for k, v in kwargs.items() if k != "beta"})
    return idx, r.indices, r.quantized, counts, r.loss, sums


@pytest.mark.parametrize("case", ["plain", "bf16", "tf32", "cosine", "channel_first", "nan_rows", "deterministic"])
def test_split_invariance(case, monkeypatch):
    """Indices, quantized rows, counts and the loss are bitwise the same for every split count, and the EMA sums
    equal within float order (bitwise in deterministic mode)."""
    g = torch.Generator().manual_seed(len(case))
    shape, dim = ((2, 12, 4, 5), 1) if case == "channel_first" else ((40, 12), -1)
    z = torch.randn(shape, generator=g).to(DEVICE)
    cb = torch.randn(70, 12, generator=g).to(DEVICE)
    kwargs = {"dim": dim}
    if case in ("bf16", "tf32"):
        kwargs["precision"] = case
    if case == "cosine":
        kwargs["distance"] = "cosine"
    if case == "nan_rows":
        z[3, 4] = z[37, 0] = float("nan")
    with kernel_variants.deterministic(case == "deterministic"):
        runs = [_run(z, cb, s, monkeypatch, **kwargs) for s in SPLITS]
    for other in runs[1:]:
        for a, b in zip(runs[0][:5], other[:5]):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        if case == "deterministic":
            assert torch.equal(runs[0][5], other[5])
        else:
            torch.testing.assert_close(runs[0][5], other[5], atol=1e-5, rtol=1e-5)
    if case == "nan_rows":
        assert runs[0][0][3] == runs[0][0][37] == -1


def _close_calls(d=32, seed=0):
    """Rows whose nearest codes are close calls: 16 rows near a cluster of 120 codes within 1e-3 of one another
    (more near-ties than the search keeps: flagged and re-searched), 32 rows near pairs of codes 1e-4 apart among
    40 separated codes (several candidates: re-scored canonically). The separated codes come first: a row counts
    every code that was within the bound of its best when the sweep met it, so a crowd met early flags it too."""
    g = torch.Generator().manual_seed(seed)
    center = torch.randn(d, generator=g)
    cluster = center + 1e-3 * torch.randn(120, d, generator=g)
    pairs = torch.randn(20, d, generator=g)
    separated = torch.cat([pairs, pairs + 1e-4 * torch.randn(20, d, generator=g)])
    cb = torch.cat([separated, cluster])
    near_cluster = center + 0.3 * torch.randn(16, d, generator=g)
    pick = torch.randint(0, 20, (32,), generator=g)
    near_pairs = separated[pick] + 0.05 * torch.randn(32, d, generator=g)
    return torch.cat([near_cluster, near_pairs]).to(DEVICE), cb.to(DEVICE)


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
@pytest.mark.parametrize("splits", ["1", "3"])
def test_fast_precisions_equal_exact_on_close_calls(precision, splits, monkeypatch):
    z, cb = _close_calls()
    monkeypatch.setenv("VAEKERNELS_SEARCH_SPLIT", splits)
    with vk.use_backend("triton"):
        exact = vk.nearest_code(z, cb)
        fast = vk.nearest_code(z, cb, precision=precision)
        flagged = tvq.flagged_rows(z, cb, precision=precision)
    assert torch.equal(fast, exact)
    # the cluster's rows went through the flagged re-search; the others did not
    assert 16 <= flagged < z.shape[0], flagged
    # exact itself is the float64 argmin wherever float64 tells the two best codes apart by more than float32 can
    d64 = torch.cdist(z.double(), cb.double()).pow(2)
    two = d64.topk(2, dim=1, largest=False).values
    clear = (two[:, 1] - two[:, 0]) > 1e-4  # float32 resolves about 1e-5 at these norms
    assert clear.sum() >= 16
    assert torch.equal(exact[clear], d64.argmin(1)[clear])


def test_exact_search_flags_duplicated_codes():
    """A codebook of identical codes (a fresh zero codebook) puts every code within the bound of the best: every
    row is flagged, and the re-search returns the lowest index, as float64 would."""
    z = torch.randn(40, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    cb = torch.zeros(50, 8, device=DEVICE)
    with vk.use_backend("triton"):
        assert torch.equal(vk.nearest_code(z, cb), torch.zeros(40, dtype=torch.int64, device=DEVICE))
        assert tvq.flagged_rows(z, cb) == 40


def test_split_count_follows_the_device(monkeypatch):
    """No split on the interpreter or when rows fill the GPU; about two waves over the SMs otherwise, at least one
    widest tile of codes per split; the environment variable overrides and is checked."""
    monkeypatch.delenv("VAEKERNELS_SEARCH_SPLIT", raising=False)
    assert tvq.search_splits(4096, 16384, torch.device("cpu")) == 1
    monkeypatch.setattr(tvq, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    assert tvq.search_splits(64 * 264, 16384, cuda) == 1
    assert tvq.search_splits(4096, 16384, cuda) == 5  # 64 row blocks -> 320 programs
    assert tvq.search_splits(2048, 16384, cuda) == 9
    assert tvq.search_splits(750, 1024, cuda) == 8  # capped at 1024 / 128 codes
    monkeypatch.setenv("VAEKERNELS_SEARCH_SPLIT", "3")
    assert tvq.search_splits(4096, 16384, cuda) == 3
    monkeypatch.setenv("VAEKERNELS_SEARCH_SPLIT", "0")
    with pytest.raises(ValueError, match="VAEKERNELS_SEARCH_SPLIT"):
        tvq.search_splits(10, 10, cuda)
