"""One OpenMP thread for the torch ops of the calling thread, every other thread's count left alone.

The reader's threads gather, concatenate and check whole row groups with torch ops large enough for torch
to run them on an OpenMP team of `torch.get_num_threads()` threads: a second team beside the training
thread's, competing with it for the same cores, so that the training's parallel regions wait at their
barriers for threads the reader displaced (local.yaml from Parquet, 2 cores, `training.num_threads=2`: 22k
examples/s with the reader's teams, 40k without; benchmarks/RESULTS.md, "End to end"). `torch.set_num_threads` cannot help:
it also sets the process-wide count that new threads start from. OpenMP's own `omp_set_num_threads` sets
the calling thread's count only, so it is called here through the OpenMP runtime torch loaded (the
reader's threads do nothing else in parallel), after torch initialized the thread's count, and checked.

Example:
    use_one_torch_thread()        # first thing in a reader thread
    torch.get_num_threads()       # 1 in this thread; the training thread keeps its own count
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os

import torch

# The names OpenMP runtimes ship under: GNU (torch's Linux wheels bundle it), LLVM (macOS), Intel.
_RUNTIMES = ("libgomp", "libomp", "libiomp5")


@functools.cache
def _set_num_threads():
    """`omp_set_num_threads` of the OpenMP runtime torch uses, or None when none is found.

    A runtime is looked up first among torch's own libraries, then by its usual file names; loading a
    name already loaded returns that library. Whether it is the one torch uses is checked by the caller.
    """
    bundled = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "lib*omp*")))
    names = [path for path in bundled if os.path.basename(path).startswith(_RUNTIMES)]
    names += ["libgomp.so.1", "libomp.so", "libomp.dylib", "libiomp5.so"]
    for name in names:
        try:
            function = ctypes.CDLL(name).omp_set_num_threads
        except (OSError, AttributeError):
            continue
        function.argtypes, function.restype = [ctypes.c_int], None
        return function
    return None


def use_one_torch_thread() -> bool:
    """Run the calling thread's torch ops on one thread; True when that took effect (else nothing changed)."""
    if torch.get_num_threads() == 1:  # also makes torch initialize this thread's count, once
        return True
    function = _set_num_threads()
    if function is None:
        return False
    function(1)
    return torch.get_num_threads() == 1  # False: the runtime found is not the one torch uses
