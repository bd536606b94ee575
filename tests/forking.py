"""Setup of a forked child process that a test SIGKILLs at a random moment."""

import threading

import torch
from tqdm import tqdm


def killable_child() -> None:
    """Call first in the child: one torch thread, and a lock of its own for tqdm's bars.

    tqdm's default write lock includes a multiprocessing semaphore that a forked child shares
    with its parent; a child killed while drawing a bar would leave it taken, and every later
    bar of the parent (and of the next children) would wait on it forever."""
    torch.set_num_threads(1)
    tqdm.set_lock(threading.RLock())
