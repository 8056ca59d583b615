"""Builds spatium_torch._C: the torch-free core (csrc/core), the CPU kernels (csrc/cpu), the
store class and kernel registration (csrc) and, when torch has CUDA and a CUDA toolkit is found,
the CUDA kernels (csrc/cuda). USE_CUDA=0 forces a
CPU-only build; SPATIUM_SANITIZE=1 builds with AddressSanitizer and UBSan (`make sanitize`).
Install with `pip install --no-build-isolation -e .`."""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    """CUDA is built when torch was built with it and a toolkit exists, never by probing a GPU."""
    if os.environ.get("USE_CUDA", "").strip() == "0":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


# Two parallel compile jobs by default: the reference machine has two cores.
os.environ.setdefault("MAX_JOBS", "2")

with_cuda = want_cuda()
# -fopenmp on compile *and* link: at::parallel_for is inline and runs serially without it.
# The language standard is torch's own (C++20 for torch 2.13); csrc/core stays C++17 (CMake).
cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter"]
extension_sources = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp") + sources("csrc/core/*.cpp")
link_flags = ["-fopenmp"]
if os.environ.get("SPATIUM_SANITIZE", "").strip() == "1":
    sanitizers = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    cxx_flags = [*cxx_flags, *sanitizers, "-O1", "-g", "-fno-omit-frame-pointer"]
    link_flags = [*link_flags, *sanitizers]
extension_kwargs = dict(
    include_dirs=[os.path.join(ROOT, "csrc")],
    extra_compile_args={"cxx": cxx_flags},
    extra_link_args=link_flags,
)
if with_cuda:
    extension_kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
    extension_kwargs["define_macros"] = [("SPATIUM_WITH_CUDA", "1")]
    extension = CUDAExtension(
        "spatium_torch._C", extension_sources + sources("csrc/cuda/*.cu"), **extension_kwargs
    )
else:
    extension = CppExtension("spatium_torch._C", extension_sources, **extension_kwargs)

# The release only ("2.13.0" of "2.13.0+cpu"): any build of the torch this links against.
TORCH_RELEASE = torch.__version__.split("+")[0]

setup(
    packages=find_packages(include=["spatium_torch", "spatium_torch.*"]),
    install_requires=[f"torch=={TORCH_RELEASE}", "numpy"],
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
