"""2-byte weights: bfloat16 and float16 matrices kept as they are stored.

A checkpoint in bfloat16 or float16 keeps its weight matrices (embedding,
unembedding, attention and MLP matrices) at 2 bytes per number; the core widens them
to float32 one panel at a time inside each matrix product. Norm weights and biases
are widened at load (they are tiny).

NumPy has float16 but no bfloat16: bfloat16 numbers are held as their bits in
arrays of the structured dtype BFLOAT16 (one uint16 field named "bfloat16"), so that
they are never mistaken for integers. The core receives them as plain uint16.
"""
import numpy as np

BFLOAT16 = np.dtype([("bfloat16", "<u2")])
NAMES = ("float32", "bfloat16", "float16")


def is_half(a):
    """True for a bfloat16 (BFLOAT16, or ml_dtypes' bfloat16) or float16 array."""
    return a.dtype == BFLOAT16 or a.dtype == np.float16 or a.dtype.name == "bfloat16"


def name_of(a):
    """'float32', 'bfloat16' or 'float16': how the array stores its numbers."""
    if a.dtype == np.float16:
        return "float16"
    if a.dtype == BFLOAT16 or a.dtype.name == "bfloat16":
        return "bfloat16"
    return "float32"


def as_bfloat16(bits):
    """uint16 bits of bfloat16 numbers -> a BFLOAT16 array (a view, no copy)."""
    return np.asarray(bits).view(np.uint16).view(BFLOAT16)


def keep(a):
    """A 2-byte array as mechscope keeps it: float16, or BFLOAT16 (ml_dtypes' bfloat16
    is viewed as such)."""
    if a.dtype.name == "bfloat16" and a.dtype != BFLOAT16:
        return as_bfloat16(a.view(np.uint16))
    return a


def to_float32(a):
    """Any floating array (bfloat16 included) -> float32, exactly for 2-byte ones."""
    if a.dtype == BFLOAT16 or a.dtype.name == "bfloat16":
        return (np.asarray(a).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(a, dtype=np.float32)


def from_float32(x, name):
    """float32 -> 'bfloat16' (rounded to nearest even, as PyTorch rounds) or 'float16'."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if name == "float16":
        return x.astype(np.float16)
    u = x.view(np.uint32)
    bits = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    return as_bfloat16(bits)


def for_core(a):
    """The array the C core takes: float32, float16, or uint16 holding bfloat16."""
    if a.dtype == BFLOAT16 or a.dtype.name == "bfloat16":
        return np.ascontiguousarray(a).view(np.uint16)
    if a.dtype == np.float16:
        return np.ascontiguousarray(a)
    return np.ascontiguousarray(a, dtype=np.float32)


def random_normal(rng, shape, std, name, chunk=1 << 22):
    """N(0, std) numbers of the given shape stored as `name`, drawn chunk by chunk so
    that no float32 copy of the whole tensor is ever made."""
    n = int(np.prod(shape))
    out = np.empty(n, BFLOAT16 if name == "bfloat16" else np.float16)
    bits = out.view(np.uint16)  # plain uint16 assignment (a structured one is slow)
    for lo in range(0, n, chunk):
        x = rng.standard_normal(min(chunk, n - lo), dtype=np.float32)
        x *= np.float32(std)
        bits[lo:lo + x.size] = from_float32(x, name).view(np.uint16)
    return out.reshape(shape)


def std(a, chunk_rows=4096):
    """Standard deviation (ddof=1) of all elements of a 2-D array of any float type,
    in float64, a chunk of rows at a time (no float64 copy of the whole array)."""
    a = np.asarray(a)
    if a.dtype == np.float32 and a.size <= 1 << 24:
        return float(np.asarray(a, np.float64).std(ddof=1))  # small: NumPy's own two-pass sum
    n, total = a.size, 0.0
    for lo in range(0, a.shape[0], chunk_rows):
        total += float(to_float32(a[lo:lo + chunk_rows]).astype(np.float64).sum())
    mean = total / n
    ss = 0.0
    for lo in range(0, a.shape[0], chunk_rows):
        d = to_float32(a[lo:lo + chunk_rows]).astype(np.float64) - mean
        ss += float(np.einsum("ij,ij->", d, d))
    return float(np.sqrt(ss / (n - 1)))
