"""Overlapping file work with the model in ``-e``: batches are read ahead in a thread, latent
files are written by a small pool of threads while the next batch is encoded.

Reading (PIL decoding) and writing (safetensors, fsync) release the GIL for most of their
time, so threads overlap them with the model without the start-up cost of processes.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor

WRITER_THREADS = 4
READ_AHEAD = 2  # batches

_DONE = object()


def read_ahead(iterable, depth: int = READ_AHEAD):
    """Yield the items of ``iterable``, produced up to ``depth`` items ahead in a thread; an
    exception of the producer is raised here, at the item where it happened."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for item in iterable:
                if stop.is_set():
                    return
                items.put((item, None))
            items.put((_DONE, None))
        except BaseException as exc:  # handed to the consumer
            items.put((_DONE, exc))

    thread = threading.Thread(target=produce, name="flexvae-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, error = items.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                items.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


class BackgroundWriter:
    """Runs write jobs in threads; ``wait`` returns once the given jobs are done (re-raising
    their errors), so a manifest line is only written after its file is."""

    def __init__(self, threads: int = WRITER_THREADS):
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="flexvae-write")

    def submit(self, fn, *args, **kwargs) -> Future:
        return self.pool.submit(fn, *args, **kwargs)

    @staticmethod
    def wait(futures) -> None:
        for future in futures:
            future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
