"""Host work spread over processes: making and preprocessing cases is single-threaded numpy/scipy,
so on a 2-core machine two processes do it in about half the time."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from typing import Callable, Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def _host_only() -> None:
    """A worker's JAX (the registration's optimiser) runs on the CPU: on a GPU/TPU host each
    worker would otherwise claim accelerator memory beside the training process."""
    os.environ["JAX_PLATFORMS"] = "cpu"


def map_cases(fn: Callable[[T], R], items: Iterable[T], desc: str, progress: bool = True,
              workers: int | None = None) -> list[R]:
    """``[fn(item) for item in items]`` with a progress bar, over ``workers`` processes (default:
    one per core; in this process when that is one, or for fewer than two items per worker).

    ``fn`` must be a module-level function and the items picklable. Processes are spawned, not
    forked: the caller may already run JAX's threads. An exception in ``fn`` is raised here.
    """
    items = list(items)
    if workers is None:
        from cowjax.devices import cpu_cores
        workers = cpu_cores()
    with tqdm(total=len(items), desc=desc, unit="case", disable=not progress, leave=False) as bar:
        if workers <= 1 or len(items) < 2 * workers:
            results = []
            for item in items:
                results.append(fn(item))
                bar.update()
            return results
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                    initializer=_host_only) as pool:
            futures = [pool.submit(fn, item) for item in items]
            try:
                for future in concurrent.futures.as_completed(futures):
                    future.result()  # the first failure is raised here ...
                    bar.update()
            except BaseException:
                pool.shutdown(cancel_futures=True)  # ... without waiting for the cases not begun
                raise
            return [f.result() for f in futures]
