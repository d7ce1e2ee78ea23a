"""Overlap detect.py's stages: decoding and letterboxing on one background thread, writing results on
another, inference on the caller's thread in between.

OpenCV's decoding, resizing and encoding and PyTorch's and ONNX Runtime's kernels release the GIL, so on
a CPU the three stages run side by side; each queue is bounded, so a fast reader never holds more than
`depth` frames in memory and a slow writer slows the loop down instead of filling memory. An error in
either thread is raised in the caller's thread (at the next item, or at close()).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

POLL_S = 0.1  # how often a blocked thread checks whether the other side has stopped


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


def prefetch(items: Iterable, depth: int = 4) -> Iterator:
    """Iterate `items` on a background thread, `depth` items ahead of the consumer. Leaving the loop
    early (break, an exception) stops the thread at its next item."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as err:  # handed to the consumer, which raises it
            put(_Failure(err))
            return
        put(_DONE)

    thread = threading.Thread(target=produce, name="vitdet-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


class BackgroundCalls:
    """Run `function(*args)` calls in order on one background thread; `close()` waits for them all and
    raises the first error any of them raised (later calls are then skipped)."""

    def __init__(self, function: Callable, depth: int = 8):
        self.function = function
        self.calls: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="vitdet-writer", daemon=True)
        self.thread.start()

    def __call__(self, *args) -> None:
        if self.error is not None:
            raise self.error
        self.calls.put(args)

    def _work(self) -> None:
        while True:
            args = self.calls.get()
            if args is _DONE:
                return
            if self.error is None:
                try:
                    self.function(*args)
                except BaseException as err:  # raised in the caller's thread
                    self.error = err

    def close(self) -> None:
        self.calls.put(_DONE)
        self.thread.join()
        if self.error is not None:
            raise self.error
