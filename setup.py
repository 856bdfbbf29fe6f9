"""rlhf_fast: pure Python, plus the C++ CPU extension when it builds.

Metadata and dependency ranges live in pyproject.toml; this file only builds the extension.
``kernels/`` (the Triton source) installs as ``rlhf_fast.kernels`` through the link
``rlhf_fast/kernels -> ../kernels``, never as a top-level ``kernels`` package: that name belongs
to the Hugging Face ``kernels`` distribution, which transformers imports.

The extension ``rlhf_fast._C`` (csrc/) is built against the torch already installed, so
install with ``pip install --no-build-isolation -e .`` (an isolated build env has no
torch; the build then skips the extension). ``RLHF_FAST_BUILD_EXT=0`` skips it on
purpose; any build failure prints a warning and installs the pure-Python package.

Instruction sets: csrc/kernels_<isa>.cpp are compiled once per ISA (generic, AVX2,
AVX-512) with that file's flags only, and the operators pick at run time the best one that
the CPU supports (cpuid) and ATen's CPU capability allows, so the built library runs on any
x86-64 CPU.
"""

import os
import platform
import sys

from setuptools import setup

# Flags for the per-ISA kernel files, keyed by file-name suffix (GCC/Clang on x86-64).
ISA_FLAGS = {
    "_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def _warn(message):
    print(f"rlhf_fast setup: WARNING: {message}; installing the pure-Python package "
          "(backend='cpp' will be unavailable)", file=sys.stderr)


def _extension():
    """(ext_modules, cmdclass) for the C++ extension, or empty ones when it cannot build."""
    if os.environ.get("RLHF_FAST_BUILD_EXT", "1") == "0":
        print("rlhf_fast setup: RLHF_FAST_BUILD_EXT=0, skipping the C++ extension", file=sys.stderr)
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # e.g. an isolated build env without torch
        _warn(f"torch is not importable ({exc}); build with pip install --no-build-isolation")
        return [], {}

    x86_gnu = platform.machine().lower() in ("x86_64", "amd64") and os.name == "posix"
    sources = ["csrc/ppo_loss.cpp", "csrc/kernels_default.cpp"]
    macros = []
    if x86_gnu:
        sources += ["csrc/kernels_avx2.cpp", "csrc/kernels_avx512.cpp"]
        macros += [("RLHF_FAST_HAVE_AVX2", None), ("RLHF_FAST_HAVE_AVX512", None)]
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # Apple clang has no -fopenmp
    ext = CppExtension(
        "rlhf_fast._C",
        sources,
        depends=["csrc/cpu_isa.h", "csrc/ppo_loss.h", "csrc/ppo_loss_kernels.h"],
        define_macros=macros,
        extra_compile_args=["-O3", "-Wno-unknown-pragmas", *openmp],
        extra_link_args=openmp,
    )

    class OptionalBuildExt(BuildExtension.with_options(use_ninja=False)):  # ninja cannot do per-file flags
        def build_extension(self, extension):
            compile_one = self.compiler._compile

            def compile_with_isa_flags(obj, src, ext_, cc_args, extra_postargs, pp_opts):
                extra = next((flags for suffix, flags in ISA_FLAGS.items() if src.endswith(suffix)), [])
                return compile_one(obj, src, ext_, cc_args, list(extra_postargs) + extra, pp_opts)

            # distutils sorts the sources; link the portable objects first so that the
            # copies of shared inline (COMDAT) functions the linker keeps are portable code.
            link = self.compiler.link

            def link_portable_first(target_desc, objects, *args, **kwargs):
                def is_isa(obj):
                    return any(obj.endswith(suffix.replace(".cpp", ".o")) for suffix in ISA_FLAGS)

                objects = sorted(objects, key=is_isa)  # stable: keeps the order within each group
                return link(target_desc, objects, *args, **kwargs)

            self.compiler._compile = compile_with_isa_flags
            self.compiler.link = link_portable_first
            try:
                super().build_extension(extension)
            finally:
                self.compiler._compile = compile_one
                self.compiler.link = link

        def build_extensions(self):
            try:  # compiler checks, compiling, linking: any failure leaves the pure-Python package
                super().build_extensions()
            except Exception as exc:
                _warn(f"building the C++ extension failed ({type(exc).__name__}: {exc})")
                self.extensions = []  # nothing to copy or install

    return [ext], {"build_ext": OptionalBuildExt}


ext_modules, cmdclass = _extension()

# The package's metadata, dependencies and their tested ranges are in pyproject.toml; this file adds the extension.
setup(ext_modules=ext_modules, cmdclass=cmdclass)
