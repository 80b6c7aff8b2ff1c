"""Build vaekernels: always the pure-Python package; the CUDA extension vaekernels._C when nvcc is found.

The extension (csrc/) includes no PyTorch header and links the CUDA runtime statically, so one build serves any
installed torch. Environment:
  VAEKERNELS_NO_CUDA=1          skip the extension
  VAEKERNELS_CUDA_ARCHS         SASS architectures, default "80;86;89;90" (PTX is added for the highest)
  CUDA_HOME, then PATH, then /usr/local/cuda locate nvcc; CUDAHOSTCXX picks nvcc's host compiler.
This file never imports torch and needs no network.
"""
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

CUDA_SOURCES = ["csrc/gaussian.cu", "csrc/vq.cu"]
CUDA_HEADERS = ["csrc/common.cuh", "csrc/philox.cuh", "csrc/ops.h"]
DEFAULT_ARCHS = "80;86;89;90"


def note(message: str) -> None:
    print(f"vaekernels: {message}", file=sys.stderr, flush=True)


def find_nvcc():
    """nvcc from CUDA_HOME, then PATH, then /usr/local/cuda; None when there is none."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    if shutil.which("nvcc"):
        candidates.append(shutil.which("nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    return next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def cuda_homes(nvcc: str) -> list:
    """Candidate CUDA toolkit roots for `nvcc`: the one nvcc reports (it may be a wrapper script), then its parent."""
    homes = []
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-E", "-x", "c++", os.devnull], capture_output=True, text=True,
                             timeout=60)
        for line in (dry.stdout + dry.stderr).splitlines():
            if line.startswith("#$ TOP="):
                homes.append(os.path.realpath(line.split("=", 1)[1].strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    return list(dict.fromkeys(homes))


def cuda_archs() -> list:
    """VAEKERNELS_CUDA_ARCHS as sorted ints ("80;86", "8.0,8.6" and "sm_80" are all accepted)."""
    raw = os.environ.get("VAEKERNELS_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = set()
    for item in raw.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip().lower().removeprefix("sm_").replace(".", "")
        if not item:
            continue
        if not item.isdigit():
            raise SystemExit(f"vaekernels: VAEKERNELS_CUDA_ARCHS={raw!r} has an invalid entry {item!r} "
                             "(expected e.g. '80;86;89;90')")
        archs.add(int(item))
    if not archs:
        raise SystemExit(f"vaekernels: VAEKERNELS_CUDA_ARCHS={raw!r} names no architecture")
    if min(archs) < 80:
        raise SystemExit(f"vaekernels: VAEKERNELS_CUDA_ARCHS={raw!r}: the kernels need compute capability 8.0 or "
                         "newer (tf32/bf16 tensor cores); set VAEKERNELS_NO_CUDA=1 to skip the extension")
    return sorted(archs)


def gencode_flags(archs: list) -> list:
    """SASS for every architecture and PTX for the highest.

    Architectures of one major version share the PTX of the lowest (sm_86 and sm_89 SASS from compute_80), so the
    front end runs once per major version instead of once per architecture.
    """
    groups = {}
    for arch in archs:
        groups.setdefault(arch // 10, []).append(arch)
    flags = []
    for members in groups.values():
        codes = [f"sm_{a}" for a in members]
        if members[0] == archs[-1]:
            codes.append(f"compute_{members[0]}")
        flags += ["-gencode", f"arch=compute_{members[0]},code=[{','.join(codes)}]"]
    if archs[-1] not in [members[0] for members in groups.values()]:
        flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


class CudaExtension(Extension):
    """vaekernels._C: the bindings (host compiler) plus the .cu sources compiled by nvcc."""

    def __init__(self, nvcc: str, archs: list, **kwargs):
        super().__init__(**kwargs)
        self.nvcc, self.archs = nvcc, archs


class BuildExt(build_ext):
    """Compiles csrc/*.cu with nvcc (in parallel, skipping up-to-date objects), then links them into the module."""

    def build_extensions(self):
        for ext in self.extensions:
            if isinstance(ext, CudaExtension):
                ext.extra_objects = list(ext.extra_objects or []) + self._compile_cuda(ext)
        super().build_extensions()

    def _compile_cuda(self, ext: CudaExtension) -> list:
        tag = "sm" + "-".join(map(str, ext.archs))
        out_dir = os.path.join(self.build_temp, "csrc")
        os.makedirs(out_dir, exist_ok=True)
        jobs = min(len(CUDA_SOURCES), os.cpu_count() or 1)
        threads = max(1, (os.cpu_count() or 1) // jobs)
        base = [ext.nvcc, "-std=c++17", "-O3", "-lineinfo", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-Icsrc",
                f"--threads={threads}"] + gencode_flags(ext.archs)
        if os.environ.get("CUDAHOSTCXX"):
            base += ["-ccbin", os.environ["CUDAHOSTCXX"]]
        newest_header = max(os.path.getmtime(h) for h in CUDA_HEADERS)

        def compile_one(src: str) -> str:
            obj = os.path.join(out_dir, f"{os.path.splitext(os.path.basename(src))[0]}.{tag}.o")
            if os.path.exists(obj) and os.path.getmtime(obj) > max(os.path.getmtime(src), newest_header):
                return obj
            start = time.time()
            done = subprocess.run(base + ["-c", src, "-o", obj], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"vaekernels: nvcc failed on {src}:\n{done.stdout}{done.stderr}")
            note(f"compiled {src} for sm_{', sm_'.join(map(str, ext.archs))} in {time.time() - start:.0f} s")
            return obj

        note(f"building the CUDA extension with {ext.nvcc} for sm_{', sm_'.join(map(str, ext.archs))} "
             f"(PTX compute_{ext.archs[-1]})")
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            return list(pool.map(compile_one, CUDA_SOURCES))


def cuda_extension():
    """The vaekernels._C extension, or None (with a printed note) when it is skipped or cannot be built."""
    if os.environ.get("VAEKERNELS_NO_CUDA", "0") not in ("", "0"):
        note("VAEKERNELS_NO_CUDA is set: installing the pure-Python package without the CUDA extension")
        return None
    nvcc = find_nvcc()
    if nvcc is None:
        note("no nvcc found (CUDA_HOME, PATH, /usr/local/cuda): installing the pure-Python package without the "
             "CUDA extension; the Triton and PyTorch backends still work")
        return None
    try:
        import pybind11
    except ImportError:
        note("pybind11 is not installed (pip install pybind11, or build with isolation): installing without the "
             "CUDA extension; the Triton and PyTorch backends still work")
        return None
    homes = cuda_homes(nvcc)
    libs = [os.path.join(h, d) for h in homes for d in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"))]
    lib = next((d for d in libs if os.path.isfile(os.path.join(d, "libcudart_static.a"))), None)
    if lib is None:
        note(f"libcudart_static.a not found under {', '.join(homes)}: installing without the CUDA extension")
        return None
    archs = cuda_archs()
    return CudaExtension(
        nvcc,
        archs,
        name="vaekernels._C",
        sources=["csrc/bindings.cpp"],
        depends=CUDA_SOURCES + CUDA_HEADERS,
        include_dirs=[pybind11.get_include(), "csrc"],
        define_macros=[("VK_CUDA_ARCHS", '"' + ";".join(map(str, archs)) + '"')],
        library_dirs=[lib],
        libraries=["cudart_static", "rt", "pthread", "dl"],
        extra_compile_args=["-std=c++17", "-O2", "-fvisibility=hidden"],
        language="c++",
    )


extension = cuda_extension()

setup(
    name="vaekernels",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for the latent bottleneck of VAEs and VQ-VAEs",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vaekernels", "vaekernels.*"]),
    package_data={"vaekernels": ["dispatch.json"]},  # the "auto" backend table (bench/run.py --dispatch)
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        "demo": ["scikit-learn", "matplotlib", "tqdm"],
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "matplotlib", "tqdm", "triton>=3.6",
                 "vector-quantize-pytorch==1.32.0", "diffusers==0.42.1", "einops", "snac==1.2.1"],
    },
    ext_modules=[extension] if extension is not None else [],
    cmdclass={"build_ext": BuildExt},
)
