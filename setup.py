"""Build of mechscope's C extension against the OpenBLAS of the scipy-openblas32 wheel.

MECHSCOPE_SANITIZE=1 builds with AddressSanitizer and UndefinedBehaviorSanitizer
(for the CI job that runs the tests against such a build)."""
import os
import sys
from glob import glob

import numpy
import scipy_openblas32
from setuptools import Extension, setup

sanitize = os.environ.get("MECHSCOPE_SANITIZE") == "1"

# -fno-math-errno: the core never reads errno after a math function, and without it
# a call like sqrtf cannot be vectorized (it might have to set errno).
# -fno-trapping-math: the core never reads the floating-point exception flags, and
# without it a loop with a choice between two values (exp_approx's range check, a
# max) is not vectorized for AVX2, which has no masked operations to keep a discarded
# operand from raising a flag (the GELU, softmax and cross-entropy loops ran scalar)
compile_args = ["-std=c11", "-O3", "-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math", "-pthread",
                "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
link_args = ["-pthread",
             # find the OpenBLAS of the installed scipy-openblas32 wheel, which sits
             # next to the mechscope package in site-packages
             "-Wl,-rpath,$ORIGIN/../scipy_openblas32/lib"]
if sanitize:
    compile_args = [a for a in compile_args if a != "-O3"] + [
        "-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
        "-fno-sanitize-recover=undefined"]
    link_args += ["-fsanitize=address,undefined"]

core = Extension(
    "mechscope._core",
    sources=sorted(glob("csrc/*.c")),
    depends=sorted(glob("csrc/*.h")),
    include_dirs=[numpy.get_include(), scipy_openblas32.get_include_dir(), "csrc"],
    library_dirs=[scipy_openblas32.get_lib_dir()],
    libraries=[scipy_openblas32.get_library()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
)

setup(ext_modules=[core])
