"""Named, realistic shape sets for bench/run.py and bench/test_bench.py.

Three sizes: "gpu" (the shapes the models train with), "cpu" (scaled down so the default CPU run takes minutes
on 2 cores; the two headline figures keep their full size) and "quick" (tiny, one shape per set, for CI).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

VAE_OPS = ("reparameterize", "gaussian_kl", "reparameterize_kl")
VQ_OPS = ("nearest_code", "vector_quantize", "vq_module")
OPS = VAE_OPS + VQ_OPS
MODES = ("fwd", "fwdbwd")
SIZES = ("gpu", "cpu", "quick")
HEADLINE_SET = "headline"  # vector_quantize fwd+bwd, vaekernels against eager, at full size on every device
QUICK_SETS = ("sd-vae", "vqgan", "rvq", HEADLINE_SET)  # what --quick runs unless --shapes says otherwise: every code path


@dataclass(frozen=True)
class Latent:
    """Posterior parameters mu and logvar, each of `shape` (batch first), for the VAE ops."""

    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def label(self) -> str:
        return "x".join(map(str, self.shape))


@dataclass(frozen=True)
class Codes:
    """VQ input z of `shape` with its channels on axis `dim`, `codes` codes of that many channels.

    `stages` > 1 is a residual VQ: the vq_module op runs all stages, the functional ops quantize one."""

    shape: tuple[int, ...]
    dim: int
    codes: int
    stages: int = 1

    @property
    def n(self) -> int:
        return math.prod(self.shape) // self.d

    @property
    def d(self) -> int:
        return self.shape[self.dim]

    @property
    def label(self) -> str:
        return f"N={self.n} D={self.d} K={self.codes}" + (f" Q={self.stages}" if self.stages > 1 else "")

    def search_flops(self, op: str) -> int:
        """2·N·K·D multiply-adds of the distance search (times the stages for the residual module)."""
        return 2 * self.n * self.codes * self.d * (self.stages if op == "vq_module" else 1)

    @property
    def dense_bytes(self) -> int:
        """What the eager formula needs for its N x K float32 distances: N*K*4 bytes, times 3 for temporaries."""
        return self.n * self.codes * 4 * 3


@dataclass(frozen=True)
class ShapeSet:
    """A named family of shapes. `only` restricts the set to (op, mode) pairs; `baseline_only` to the
    comparison of vaekernels with the eager formula (the headline figures)."""

    name: str
    description: str
    shapes: tuple
    only: tuple[tuple[str, str], ...] | None = None
    baseline_only: bool = False

    @property
    def ops(self) -> tuple[str, ...]:
        return VAE_OPS if isinstance(self.shapes[0], Latent) else VQ_OPS

    def runs(self, op: str, mode: str) -> bool:
        if op not in self.ops or (op == "nearest_code" and mode == "fwdbwd"):
            return False
        return self.only is None or (op, mode) in self.only


# bench/overhead.py: the sizes at which every op must be at least as fast as its eager formula, host path included
OVERHEAD = {
    "4x4": (Latent((4, 4)), Codes((4, 8), -1, 8)),
    "64x128": (Latent((64, 128)), Codes((256, 64), -1, 512)),
    "64x4x64x64": (Latent((64, 4, 64, 64)), Codes((8192, 64), -1, 4096)),
}
# bench/gpu_check.sh first-contact (`bench/run.py --first-contact`): the first GPU contact's headline numbers, one
# shape per op from the GPU-size sets, as (op, set, shape label), forward and (where the op has one) forward+backward
FIRST_CONTACT = (
    ("reparameterize_kl", "bandwidth", "4096x4x32x32"),  # 2^24 float32 elements: % of the measured copy bandwidth
    ("reparameterize_kl", "mlp-vae", "64x128"),  # the small latent, launch-bound (the run's launch counts are on it)
    ("nearest_code", "llamagen", "N=65536 D=8 K=16384"),
    ("nearest_code", "large", "N=16384 D=256 K=8192"),
    ("vector_quantize", "vqgan", "N=4096 D=256 K=16384"),
)
# the headline figures: speed and memory at a mid-size search (16384 rows of 64 dims, 8192 codes; target: at least
# as fast as eager in at most 15% of its memory), and LlamaGen's tokenizer batch at training size (65536 tokens of
# 8 dims, 16384 codes: eager's N x K distances alone take 4 GiB; target: peak under 1 GiB)
MIDSIZE_SEARCH = Codes((16384, 64), -1, 8192)
LLAMAGEN_BATCH = Codes((65536, 8), -1, 16384)


def shape_sets(size: str) -> dict[str, ShapeSet]:
    """The shape sets at one of SIZES, by name."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    gpu, cpu = size == "gpu", size == "cpu"

    def pick(gpu_shapes, cpu_shapes, quick_shapes):
        return tuple(gpu_shapes if gpu else cpu_shapes if cpu else quick_shapes)

    sweep = range(20, 27) if gpu else (14, 16, 18) if cpu else (14,)
    sets = [
        ShapeSet("mlp-vae", "MLP VAE latents (batch x latent): 128x32, 64x128",
                 pick([Latent((128, 32)), Latent((64, 128))], [Latent((128, 32)), Latent((64, 128))],
                      [Latent((64, 128))])),
        ShapeSet("sd-vae", "Stable Diffusion VAE latents (batch x 4 x H x W; GPU size 8x4x64x64, 32x4x128x128)",
                 pick([Latent((8, 4, 64, 64)), Latent((32, 4, 128, 128))],
                      [Latent((2, 4, 64, 64)), Latent((2, 4, 128, 128))], [Latent((2, 4, 16, 16))])),
        ShapeSet("bandwidth", "bandwidth sweep: 2^k elements as (2^k/4096) x 4 x 32 x 32 (GPU size k = 20..26)",
                 tuple(Latent((2**k // 4096, 4, 32, 32)) for k in sweep)),
        ShapeSet("vqgan", "VQGAN: 16x16 tokens of 256 dims per image (NCHW, dim=1; 16 images at GPU size), 1024 "
                          "and 16384 codes",
                 pick([Codes((16, 256, 16, 16), 1, 1024), Codes((16, 256, 16, 16), 1, 16384)],
                      [Codes((1, 256, 16, 16), 1, 1024), Codes((1, 256, 16, 16), 1, 16384)],
                      [Codes((1, 256, 4, 4), 1, 64)])),
        ShapeSet("llamagen", "LlamaGen tokenizer: tokens of 8 dims (NCHW, dim=1; 65536 at GPU size), 16384 codes",
                 pick([Codes((64, 8, 32, 32), 1, 16384)], [Codes((2, 8, 32, 32), 1, 16384)],
                      [Codes((1, 8, 8, 8), 1, 256)])),
        ShapeSet("rvq", "SoundStream/EnCodec residual VQ: 8 quantizers x 1024 codes x 128 dims, clips of 750 frames "
                        "(16 at GPU size)",
                 pick([Codes((16, 750, 128), -1, 1024, 8)], [Codes((1, 750, 128), -1, 1024, 8)],
                      [Codes((1, 30, 128), -1, 64, 2)])),
        ShapeSet("large", "large search: rows of 256 dims, 16384 codes (GPU size: 16384 rows of 8192 codes, then "
                          "65536 of 16384)",
                 pick([Codes((16384, 256), -1, 8192), Codes((65536, 256), -1, 16384)], [Codes((512, 256), -1, 16384)],
                      [Codes((64, 256), -1, 256)])),
        ShapeSet(HEADLINE_SET, "headline figures: vector_quantize fwd+bwd vs the eager formula at a mid-size search "
                               "and at LlamaGen's tokenizer batch (full size on the CPU too)",
                 pick([MIDSIZE_SEARCH, LLAMAGEN_BATCH], [MIDSIZE_SEARCH, LLAMAGEN_BATCH],
                      [Codes((256, 64), -1, 128), Codes((512, 8), -1, 256)]),
                 only=(("vector_quantize", "fwdbwd"),), baseline_only=True),
    ]
    return {s.name: s for s in sets}
