"""Builds align_detr._C: the C++ ops always, the CUDA kernels when CUDA is usable.

CUDA is compiled when ``torch.cuda.is_available()`` or ``FORCE_CUDA=1`` (a GPU-less build box).
The usual variables are honoured: ``TORCH_CUDA_ARCH_LIST`` (required without a GPU, e.g.
"8.0;9.0+PTX"), ``CUDA_HOME`` (e.g. /usr/local/cuda), ``NVCC_FLAGS`` (extra nvcc flags, split on
spaces) and ``MAX_JOBS`` (ninja parallelism).

PTX: when no entry of ``TORCH_CUDA_ARCH_LIST`` ends in ``+PTX``, the newest listed architecture
gets it, so GPUs newer than the list (e.g. sm_100 / sm_120 with "8.0;9.0") JIT-compile the
kernels instead of failing with "no kernel image is available". Set ``ALIGN_DETR_NO_PTX=1`` to
build exactly the list. (Without the variable, torch builds for the visible GPUs and adds PTX
for the newest one itself.)
"""

import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.cuda.is_available() and CUDA_HOME is not None


def with_ptx(arch_list: str) -> str:
    """Adds +PTX to the newest architecture of a TORCH_CUDA_ARCH_LIST value that has none."""
    entries = [e for e in arch_list.replace(",", ";").replace(" ", ";").split(";") if e]
    if not entries or any(e.endswith("+PTX") for e in entries):
        return arch_list

    def version(entry: str):
        try:
            return tuple(int(x) for x in entry.split("+")[0].split("."))
        except ValueError:  # named architectures (e.g. "Hopper") sort first
            return (-1,)

    newest = max(range(len(entries)), key=lambda i: version(entries[i]))
    if version(entries[newest]) == (-1,):
        return arch_list
    entries[newest] += "+PTX"
    return ";".join(entries)


def get_extension():
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    # -fopenmp: at::parallel_for is inline OpenMP code in torch's headers; without it the CPU
    # kernels would silently run on one thread. libgomp is the one torch already loaded.
    cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Werror=deprecated-declarations"]
    define_macros = []
    extension = CppExtension
    extra_compile_args = {"cxx": cxx_flags}
    if want_cuda():
        if CUDA_HOME is None:
            raise RuntimeError(
                "FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME (e.g. /usr/local/cuda)"
            )
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            raise RuntimeError(
                "building CUDA kernels without a visible GPU needs TORCH_CUDA_ARCH_LIST, "
                'e.g. TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"'
            )
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if arch_list and os.environ.get("ALIGN_DETR_NO_PTX", "0") != "1":
            os.environ["TORCH_CUDA_ARCH_LIST"] = with_ptx(arch_list)
        extension = CUDAExtension
        sources += cuda_sources
        define_macros.append(("WITH_CUDA", None))
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        nvcc_flags += os.environ.get("NVCC_FLAGS", "").split()
        extra_compile_args["nvcc"] = nvcc_flags
    return extension(
        "align_detr._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=["-fopenmp"],
    )


setup(
    name="align_detr",
    version="0.1.0",
    description="Align-DETR and SD-DETR on a DINO-style deformable DETR, for detectron2",
    packages=find_packages(exclude=("configs", "tests", "benchmarks", "tools", "demo")),
    python_requires=">=3.10",
    ext_modules=[get_extension()],
    cmdclass={"build_ext": BuildExtension},
)
