"""launch.py restarts itself with glibc's huge-page tunable only where it can help, once, keeping
the user's tunables and choice."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from cowjax import huge_pages

ROOT = Path(__file__).resolve().parents[1]
GLIBC_LINUX = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _thp(tmp_path, mode):
    path = tmp_path / "enabled"
    path.write_text(mode + "\n")
    return str(path)


@pytest.mark.skipif(not GLIBC_LINUX, reason="glibc on Linux only")
def test_wanted_only_where_the_kernel_gives_huge_pages_on_request(tmp_path):
    assert huge_pages.wanted({}, _thp(tmp_path, "always [madvise] never"))
    assert not huge_pages.wanted({}, _thp(tmp_path, "[always] madvise never"))
    assert not huge_pages.wanted({}, _thp(tmp_path, "always madvise [never]"))
    assert not huge_pages.wanted({}, str(tmp_path / "missing"))


def test_the_users_settings_win(tmp_path):
    madvise = _thp(tmp_path, "always [madvise] never")
    assert not huge_pages.wanted({"COWJAX_HUGE_PAGES": "0"}, madvise)
    assert not huge_pages.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, madvise)
    env = huge_pages.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
                   "HOME": "/h"}
    assert huge_pages.environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


@pytest.mark.skipif(not huge_pages.wanted(), reason="this machine's kernel or libc gains nothing")
def test_the_restart_runs_the_same_command_once_with_the_tunable():
    code = ("import os, sys; from cowjax import huge_pages; print('start', flush=True); "
            "huge_pages.restart_with_huge_pages(); "
            "print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "COWJAX_HUGE_PAGES")}
    out = subprocess.run([sys.executable, "-c", code, "a", "--b=1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["start", "start", "glibc.malloc.hugetlb=1 ['a', '--b=1']"]
