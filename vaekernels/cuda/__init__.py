"""The CUDA C++ backend: thin wrappers over the pybind11 extension vaekernels._C (built from csrc/ by setup.py).

The extension knows nothing of torch: this module allocates every output and workspace with torch and passes raw
device pointers, sizes, row layouts (strides), dtype codes and the current stream; the C++ side makes the tensors'
device current for the launch and raises RuntimeError("vaekernels._C.<op>: <CUDA error>") on failure.
The kernels cover float32, float16 and bfloat16 (float32 accumulation, mixed z / codebook dtypes converted on
load); any float64 input runs on the reference (PyTorch) backend instead. Under
`torch.use_deterministic_algorithms(True)` the per-code scatters (EMA sums, codebook gradient) sort rows by code
and sum them in a fixed order instead of using float atomics; all other reductions are always deterministic.
"""
from __future__ import annotations

import functools

import torch

from .. import reference

OPS = reference.OPS - {"lfq_fwd", "lfq_bwd", "ibq_fwd", "ibq_bwd"}  # the DISPATCH_OPS it implements: the reference's but LFQ and IBQ
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_KL_MODES = {"none": 0, "elementwise": 1, "sum": 2, "latent": 3, "sample": 4}
_PRECISIONS = {"exact": 0, "tf32": 1, "bf16": 2}
_NO_LAYOUT = (1, 0, 0, 0)


def _ext():
    from .. import _C

    return _C


@functools.lru_cache(maxsize=None)
def availability() -> tuple[bool, str]:
    """(available, reason): the extension must be built, a CUDA device visible, and its kernels runnable there."""
    try:
        _C = _ext()
    except ImportError as e:
        return False, f"extension vaekernels._C is not built ({e}); reinstall with nvcc on PATH or CUDA_HOME set"
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to PyTorch (driver missing or no GPU)"
    device = torch.cuda.current_device()
    problem = _C.device_problem(device)
    if problem:
        return False, problem
    major, minor = torch.cuda.get_device_capability(device)
    return True, f"CUDA device {torch.cuda.get_device_name(device)} (sm_{major}{minor})"


def build_info() -> dict:
    """For `python -m vaekernels info`: built architectures and CUDA version, or why the extension is absent."""
    try:
        info = dict(_ext().build_info())
    except ImportError as e:
        return {"built": False, "reason": f"vaekernels._C is not built ({e}): no nvcc at install time, or "
                                          "VAEKERNELS_NO_CUDA was set"}
    return {"built": True, **info}


# ---------------------------------------------------------------- launch helpers shared by every op


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _code(t: torch.Tensor | None) -> int:
    return 0 if t is None else _DTYPES[t.dtype]


def _ctx(t: torch.Tensor) -> tuple[int, int]:
    """(device index, current stream handle) for launches on t's device."""
    return t.device.index, torch.cuda.current_stream(t.device).cuda_stream


def _workspace(nbytes: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, device=like.device)


def _has_float64(*tensors) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def _layout(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """(t or a contiguous copy, layout) with element (n, d) of the rows view `reference.vq.rows(t, dim)` at
    (n // inner) * s_outer + (n % inner) * s_inner + d * s_d.

    The row axes (all but `dim`) must collapse into at most two strided groups, which holds for contiguous,
    channels-last, permuted-from-contiguous and most sliced tensors; anything else is copied to contiguous first.
    """
    dim %= t.dim()
    groups = []  # [size, stride] of the collapsed row axes, outermost first
    for size, stride in zip(t.shape[:dim] + t.shape[dim + 1:], t.stride()[:dim] + t.stride()[dim + 1:]):
        if size == 1:
            continue
        if groups and groups[-1][1] == stride * size:
            groups[-1] = [groups[-1][0] * size, stride]
        else:
            groups.append([size, stride])
    if len(groups) > 2:
        return _layout(t.contiguous(), dim)
    if len(groups) < 2:
        return t, (1, groups[0][1] if groups else 0, 0, t.stride(dim))
    (_, s_outer), (inner, s_inner) = groups
    return t, (inner, s_outer, s_inner, t.stride(dim))


@functools.lru_cache(maxsize=4096)
def _gaussian_workspace(device: int, dtype: int, numel: int, rows: int, mode: int) -> int:
    return _ext().gaussian_forward_workspace(device, dtype, numel, rows, mode)


@functools.lru_cache(maxsize=4096)
def _vq_workspace(device: int, n: int, k: int, d: int, precision: int) -> int:
    return _ext().vq_workspace(device, n, k, d, precision)


def _deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()


# ---------------------------------------------------------------- Gaussian


def _kl_output(mu: torch.Tensor, kl_mode: str) -> torch.Tensor | None:
    if kl_mode == "none":
        return None
    if kl_mode == "elementwise":
        return torch.empty_like(mu)
    if kl_mode == "sum":
        return mu.new_empty((), dtype=torch.float32)
    return mu.new_empty((mu.numel() // mu.shape[0],) if kl_mode == "latent" else (mu.shape[0],), dtype=torch.float32)


def _device_seed(seed: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """The seed where the kernels read it: on the tensors' device (eager calls draw it on the host)."""
    return seed.to(like.device, non_blocking=True) if seed is not None and seed.device != like.device else seed


def gaussian_forward(mu, logvar, prior_mu, prior_logvar, seed, kl_mode, kl_scale):
    if mu.dtype == torch.float64:
        return reference.gaussian_forward(mu, logvar, prior_mu, prior_logvar, seed, kl_mode, kl_scale)
    seed = _device_seed(seed, mu)
    rows = mu.shape[0] if mu.dim() else 1
    z = torch.empty_like(mu) if seed is not None else None
    kl = _kl_output(mu, kl_mode)
    device, stream = _ctx(mu)
    ws = _workspace(_gaussian_workspace(device, _code(mu), mu.numel(), rows, _KL_MODES[kl_mode]), mu)
    _ext().gaussian_forward(device, stream, _code(mu), mu.numel(), rows, _ptr(mu), _ptr(logvar), _ptr(prior_mu),
                            _ptr(prior_logvar), _ptr(seed), _ptr(z), _KL_MODES[kl_mode], _ptr(kl), float(kl_scale),
                            _ptr(ws), ws.numel())
    return z, kl


def gaussian_backward(dz, dkl, mu, logvar, prior_mu, prior_logvar, seed, z, kl_mode, kl_scale):  # z unused: eps is regenerated
    if mu.dtype == torch.float64:
        return reference.gaussian_backward(dz, dkl, mu, logvar, prior_mu, prior_logvar, seed, z, kl_mode, kl_scale)
    dz = dz.to(mu.dtype).contiguous() if dz is not None else None
    seed = _device_seed(seed, mu)
    if dkl is not None:
        dkl = dkl.contiguous() if dkl.dtype in _DTYPES else dkl.float().contiguous()
        if kl_scale != 1.0:
            dkl = dkl * kl_scale
    with_kl = dkl is not None
    dmu = torch.empty_like(mu) if with_kl else None
    dpmu = torch.empty_like(prior_mu) if with_kl and prior_mu is not None else None
    dplv = torch.empty_like(prior_logvar) if with_kl and prior_logvar is not None else None
    dlogvar = torch.empty_like(logvar)
    rows = mu.shape[0] if mu.dim() else 1
    _ext().gaussian_backward(*_ctx(mu), _code(mu), mu.numel(), rows, _ptr(mu), _ptr(logvar), _ptr(prior_mu),
                             _ptr(prior_logvar), _ptr(seed), _ptr(dz), _ptr(dkl), _code(dkl), _KL_MODES[kl_mode],
                             _ptr(dmu), _ptr(dlogvar), _ptr(dpmu), _ptr(dplv))
    return dmu, dlogvar, dpmu, dplv


# ---------------------------------------------------------------- vector quantization


def _search(z, codebook, dim, precision, epilogue, sums_wanted):
    """The search (and with `epilogue` the VQ epilogue): (indices (N,), quantized, sq_err, counts, sums)."""
    zs, lz = _layout(z, dim)
    cb = codebook.contiguous()
    d, k = z.shape[dim], cb.shape[0]
    n = z.numel() // d
    idx = torch.empty(n, dtype=torch.int64, device=z.device)
    q = sq_err = counts = sums = None
    lq = _NO_LAYOUT
    if epilogue:
        q = torch.empty(z.shape, dtype=z.dtype, device=z.device)
        lq = _layout(q, dim)[1]
        sq_err = z.new_empty((), dtype=torch.float32)
        counts = torch.zeros(k, dtype=torch.int64, device=z.device)
        if sums_wanted:
            sums = torch.zeros((k, d), dtype=torch.float32, device=z.device)
    deterministic_sums = sums is not None and _deterministic()
    device, stream = _ctx(z)
    ws = _workspace(_vq_workspace(device, n, k, d, _PRECISIONS[precision]), z)
    _ext().vq_search(device, stream, _ptr(zs), _code(zs), lz, n, d, _ptr(cb), _code(cb), k, _PRECISIONS[precision],
                     _ptr(idx), _ptr(q), lq, _ptr(counts), 0 if deterministic_sums else _ptr(sums), _ptr(sq_err),
                     _ptr(ws), ws.numel())
    if deterministic_sums:
        _segment_sum(zs, lz, cb, idx, sums, None, 0.0)
    return idx, q, sq_err, counts, sums


def _segment_sum(zs, lz, cb, idx, out, coef, scale):
    """Deterministic per-code sums into `out` (zeroed, float32): rows sorted (stably) by code, fixed-order sums."""
    k, d = cb.shape
    n = idx.numel()
    keys, order = torch.sort(torch.where(idx < 0, k, idx), stable=True)
    offsets = torch.searchsorted(keys, torch.arange(k + 1, dtype=keys.dtype, device=keys.device))
    ws = _workspace(_ext().segment_sum_workspace(n, d), zs)
    _ext().segment_sum(*_ctx(zs), _ptr(zs), _code(zs), lz, n, d, _ptr(cb), _code(cb), k, _ptr(order), _ptr(keys),
                       _ptr(offsets), _ptr(coef), _code(coef), float(scale), _ptr(out), _ptr(ws), ws.numel())


def nearest_code(z, codebook, dim, precision):
    if _has_float64(z, codebook):
        return reference.nearest_code(z, codebook, dim, precision)
    return _search(z, codebook, dim, precision, False, False)[0].view(reference.vq.index_shape(z, dim))


def vq_forward(z, codebook, dim, precision, with_sums):
    if _has_float64(z, codebook):
        return reference.vq_forward(z, codebook, dim, precision, with_sums)
    idx, q, sq_err, counts, sums = _search(z, codebook, dim, precision, True, with_sums)
    return q, idx.view(reference.vq.index_shape(z, dim)), sq_err, counts, sums


def vq_backward(dq, z, codebook, indices, d_commit, d_codebook, dim, estimator):
    if _has_float64(z, codebook, dq, d_commit, d_codebook):
        return reference.vq_backward(dq, z, codebook, indices, d_commit, d_codebook, dim, estimator)
    zs, lz = _layout(z, dim)
    dqs, ldq = _layout(dq.to(z.dtype), dim) if dq is not None else (None, _NO_LAYOUT)
    cb = codebook.contiguous()
    idx = indices.reshape(-1).contiguous()
    k, d = cb.shape
    n = idx.numel()
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    dcb = torch.zeros((k, d), dtype=torch.float32, device=z.device) if d_codebook is not None else None
    deterministic_scatter = dcb is not None and _deterministic()
    scale = 2.0 / z.numel()
    _ext().vq_backward(*_ctx(z), _code(zs), n, d, _ptr(zs), lz, _ptr(dqs), ldq, _ptr(cb), _code(cb), _ptr(idx),
                       _ptr(d_commit), _code(d_commit), _ptr(d_codebook), _code(d_codebook), scale,
                       estimator == "rotation", _ptr(dz), _layout(dz, dim)[1],
                       0 if deterministic_scatter else _ptr(dcb))
    if deterministic_scatter:
        _segment_sum(zs, lz, cb, idx, dcb, d_codebook, scale)
    return dz, (dcb.to(codebook.dtype) if dcb is not None else None)
