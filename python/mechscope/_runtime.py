"""Loading the compute core and the process-wide settings: threads, memory budget."""
import ctypes
import numbers
import os
import platform


def _load_blas():
    """Load the OpenBLAS of the scipy-openblas32 wheel, which the extension is linked
    against; returns the path of the library.

    OpenBLAS's worker threads spin for up to 2^28 cycles after each call before they
    sleep. Between mechscope's matrix products its own threads need those cores, so
    the workers are told to sleep at once (2^4 cycles). OpenBLAS reads the setting
    when the library loads (importing scipy_openblas32 loads it); the environment is
    restored afterwards, so that child processes and other BLAS libraries are not
    affected. A value the user set is kept."""
    own = "OPENBLAS_THREAD_TIMEOUT" not in os.environ
    if own:
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"
    try:
        import scipy_openblas32

        path = os.path.join(scipy_openblas32.get_lib_dir(), "lib" + scipy_openblas32.get_library() + ".so")
        # loading it by its full path makes the extension find it wherever pip put the
        # two packages (the extension's run-time search path covers the usual case)
        if os.path.exists(path):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    finally:
        if own:
            del os.environ["OPENBLAS_THREAD_TIMEOUT"]
    return path


# a kernel set named in the environment when the library loaded replaces OpenBLAS's
# own choice for this CPU (show_config says so)
_blas_coretype_env = os.environ.get("OPENBLAS_CORETYPE")
_blas_path = _load_blas()

from . import _core  # noqa: E402

_memory_budget = None


def set_num_threads(n):
    """Use ``n`` threads for the BLAS and for mechscope's own loops (all later runs)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n: expected an int, got {type(n).__name__}")
    _core.set_num_threads(int(n))


def get_num_threads():
    """The number of threads runs use."""
    return _core.get_num_threads()


def _default_memory_budget():
    # half of the machine's physical memory: a run that needs more is almost
    # certainly a mistake (a cache of every site of a long batch), not an intent
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def set_memory_budget(nbytes):
    """Refuse, before any work, runs whose outputs and working memory exceed ``nbytes``.

    ``None`` restores the default (half of the physical memory)."""
    global _memory_budget
    if nbytes is None:
        _memory_budget = None
        return
    if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral):
        raise TypeError(f"nbytes: expected an int number of bytes (or None), got {type(nbytes).__name__}")
    if nbytes <= 0:
        raise ValueError(f"nbytes: expected a positive number of bytes, got {nbytes!r}")
    _memory_budget = int(nbytes)


def format_bytes(n):
    """A byte count for people: '512 bytes', '3.2 KiB', '1.5 MiB', '2.0 GiB'."""
    n = int(n)
    if abs(n) < 1024:
        return f"{n} byte" + ("" if n == 1 else "s")
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n_unit = n / 1024
        if abs(n_unit) < 1024 or unit == "TiB":
            return f"{n_unit:.1f} {unit}" if abs(n_unit) < 100 else f"{n_unit:.0f} {unit}"
        n = n_unit
    return f"{n} bytes"


def get_memory_budget():
    """The memory budget in bytes."""
    return _memory_budget if _memory_budget is not None else _default_memory_budget()


def _cpu_features():
    wanted = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
              "avx512_bf16", "avx512_vnni", "amx_tile", "neon", "asimd", "sve")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _blas_own_corename():
    """The kernel set OpenBLAS picks for this CPU when the environment names none: asked
    of a fresh interpreter, since the library reads OPENBLAS_CORETYPE once, at load."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    code = ("import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); "
            "f = lib.scipy_openblas_get_corename; f.restype = ctypes.c_char_p; print(f().decode())")
    try:
        done = subprocess.run([sys.executable, "-c", code, _blas_path], env=env, capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def show_config():
    """Print the BLAS mechscope uses, the kernels it picked for this CPU, and the threads."""
    config, corename, kernels = _core.blas_info()
    features = _cpu_features()
    print(f"mechscope {__import__('mechscope').__version__}")
    print(f"BLAS:         {config}")
    print(f"BLAS library: {_blas_path}")
    if _blas_coretype_env:
        print(f"BLAS kernels: {corename} (set by OPENBLAS_CORETYPE={_blas_coretype_env} in the environment; "
              f"OpenBLAS's own choice for this CPU: {_blas_own_corename()})")
    else:
        print(f"BLAS kernels: {corename} (chosen at run time for this CPU)")
    print(f"mechscope:    {kernels}; element-wise loops chosen at load for this CPU")
    print(f"threads:      {get_num_threads()} (os.cpu_count() = {os.cpu_count()})")
    print(f"CPU:          {_cpu_name()}")
    print(f"CPU features: {' '.join(features) if features else 'unknown'}")
    if not any(f.startswith("avx512") for f in features) and platform.machine() == "x86_64":
        print("              (this CPU reports no AVX-512: AVX2 kernels are the fastest available)")
    print(f"memory budget: {format_bytes(get_memory_budget())} per run")
