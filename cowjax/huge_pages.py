"""Transparent huge pages for the large blocks glibc's malloc maps: ``launch.py`` restarts itself
with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` before it imports anything heavy.

Why: XLA's CPU runtime allocates each call's working memory afresh (the paper network's bench, one
step per call: a 701 MB block per device and a dozen 38 MB ones), and glibc serves blocks above 32
MB with ``mmap``, so the kernel zero-fills every 4 KB page again at every call: about a million page
faults per call of four train steps. With the tunable, malloc asks for huge pages on those mappings
(``madvise``), 2 MB a fault: the faults drop about 45-fold, the paper network's CPU step runs 14-17%
sooner and the demo's 5-7% (BENCHMARKS.md, 2026-12-05). Only the process's allocator changes; no
result does.

The tunable is read once, when the process starts, so it takes a restart (``os.execve`` before JAX
is imported: 0.05-0.2 s for the interpreter and absl again). Nothing happens where it could not help
or was set already: not Linux or not glibc, the kernel's huge pages off (``never``) or on for every
mapping (``always``), ``glibc.malloc.hugetlb`` already in ``GLIBC_TUNABLES`` (the user's value
wins), or ``COWJAX_HUGE_PAGES=0``.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def wanted(environ=os.environ, thp_mode_file: str = THP_MODE) -> bool:
    """Whether restarting with the tunable would change anything here."""
    if environ.get("COWJAX_HUGE_PAGES", "1") == "0" or TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        with open(thp_mode_file) as f:
            mode = f.read()
    except OSError:
        return False
    return "[madvise]" in mode   # "[always]": every mapping has them already; "[never]": none can


def environment(environ=os.environ) -> dict:
    """``environ`` with the tunable added to whatever ``GLIBC_TUNABLES`` holds."""
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    return {**environ, "GLIBC_TUNABLES": ":".join([*tunables, f"{TUNABLE}=1"])}


def restart_with_huge_pages() -> None:
    """Replace this process by the same command with the tunable set, where ``wanted``; returns
    (and the process goes on as it is) otherwise or if the restart cannot be made."""
    if not wanted():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment())
    except OSError:
        pass
