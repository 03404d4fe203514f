"""Build the optional C extension npulm.cpu._kernels (CPU matmuls over GGUF blocks, fused block ops); metadata is in
pyproject.toml.

The package is built on the machine that runs it, so the kernels are compiled with -march=native (or -mcpu=native)
when the compiler accepts it; set NPULM_NATIVE=0 to build portable code (then only baseline SIMD, e.g. SSE2 on
x86-64, and the scalar kernels are used). If the extension fails to build, installation continues without it and
npulm falls back to numpy (one warning at run time).
"""

import os
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    def run(self) -> None:
        # objects and libraries left in build/ may come from other flags (NPULM_NATIVE) or an earlier success:
        # always recompile, and drop the old library so that a failed build cannot ship it
        self.force = True
        for ext in self.extensions:
            path = self.get_ext_fullpath(ext.name)
            if os.path.exists(path):
                os.remove(path)
        super().run()

    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "msvc":
            flags = ["/O2"]
        else:
            # -std=c11 (strict ISO) turns off GCC's fusing of a * b + c into FMA; the plain-C loops want it back
            flags = ["-O3", "-std=c11", "-ffp-contract=fast"]
            if os.environ.get("NPULM_NATIVE", "1") != "0":
                for flag in ("-march=native", "-mcpu=native"):
                    if self._accepts(flag):
                        flags.append(flag)
                        break
        for ext in self.extensions:
            ext.extra_compile_args = flags + list(ext.extra_compile_args)
        super().build_extensions()

    def _accepts(self, flag: str) -> bool:
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "probe.c")
            with open(src, "w") as f:
                f.write("int main(void) { return 0; }\n")
            try:
                self.compiler.compile([src], output_dir=d, extra_postargs=[flag])
            except Exception:
                return False
        return True


kernels = Extension(  # matmuls over GGUF blocks + the fused small ops of the block (one thread pool for both)
    "npulm.cpu._kernels",
    sources=["npulm/cpu/module.c", "npulm/cpu/kernels.c", "npulm/cpu/ops.c", "npulm/cpu/wkv.c"],
    depends=["npulm/cpu/kernels.h"],
    libraries=[] if os.name == "nt" else ["pthread", "m"],
    optional=True,  # a failed build leaves the numpy path
)

npu_host = Extension(  # the host work around NPU calls (A packing, C epilogue); numpy when missing
    "npulm.npu._host", sources=["npulm/npu/host.c"], libraries=[] if os.name == "nt" else ["pthread", "m"],
    optional=True)

# the header ships as package data: `depends` alone leaves it out of the sdist
setup(ext_modules=[kernels, npu_host], cmdclass={"build_ext": BuildExt}, package_data={"npulm.cpu": ["kernels.h"]})
