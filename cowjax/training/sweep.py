"""A sweep: several loss settings trained together as one program (``config.sweep``).

  python launch.py --config=configs/demo.py --workdir=runs/strategies \
      --config.sweep.weighting="('fixed','uncertainty','dwa','gradnorm')"
  python launch.py --mode=eval --workdir=runs/strategies          # the members compared again
  python launch.py --mode=predict --workdir=runs/strategies/member_2 --input=IMG --output=OUT

Member k is the base config with the k-th value of every list in ``config.sweep``
(``config_defaults.sweep_configs``). ``train.train_and_evaluate`` trains the members side by side:
their train states stacked on a leading axis (``stack``), one step for all of them
(``train.make_train_step(..., members=...)``) on the batch they share, the batch split over the
('data',) mesh as in a run and the stacked state replicated. That step is one ``jax.vmap`` over
the members (``config.train.sweep_impl="vmap"``, the default on GPU/TPU), or on a CPU each
member's own step side by side in the one program ("unroll"): XLA's CPU backend turns vmap's
per-member convolution kernels into grouped convolutions that ran 11x slower than the members'
own steps (bench "sweep", configs/demo.py, 4 members, 2026-12-01), while the unrolled sweep takes
what its members' steps take together. Member k's parameters are those of a run with its config
and the same seed (``tests/test_sweep.py``). The members train the first network only (the
refinement stage is trained on patches around the true landmarks, whatever the first network's
loss).

Workdir: ``sweep.json`` (the members and their settings), ``split.json`` (the one split), and per
member an ordinary run workdir ``member_<k>/`` (its own config, split, metrics, checkpoints, best
and curves), so ``--mode=predict`` and ``--mode=eval`` take a member as any run. Started again, a
sweep resumes every member from the latest step all of them saved.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp

from cowjax.errors import CowjaxError, atomic_output

RECORD = "sweep.json"


def is_sweep(config) -> bool:
    """Whether ``config.sweep`` sets any list (configs saved before sweeps existed have none)."""
    return any(v is not None for v in (config.get("sweep") or {}).values())


def is_sweep_dir(workdir) -> bool:
    return (Path(workdir) / RECORD).is_file()


def impl(config) -> str:
    """How the members share a step: ``config.train.sweep_impl``, "auto" being "unroll" on a CPU
    and "vmap" elsewhere (see the module docstring)."""
    chosen = config.train.get("sweep_impl", "auto")
    if chosen != "auto":
        return chosen
    return "unroll" if jax.default_backend() == "cpu" else "vmap"


def settings(config, members: dict) -> dict:
    """{member name: {swept field: its value}}: what sets each member apart."""
    from cowjax.config_defaults import SWEEP_FIELDS
    swept = [f for f in SWEEP_FIELDS if config.sweep.get(f) is not None]
    return {name: {f: c.loss[f] for f in swept} for name, c in members.items()}


def prepare(root, config, members: dict) -> dict[str, Path]:
    """Record the sweep in ``root/sweep.json`` and give every member its workdir with the sweep's
    split (``root/split.json``, made by ``pipeline.prepare_data``; and its registration template,
    if any, so a member moved elsewhere still finds it). Returns {name: workdir}.
    CowjaxError when ``root`` holds a sweep of other members."""
    from cowjax.data import pipeline
    root = Path(root)
    record = {"members": settings(config, members)}
    path = root / RECORD
    if path.is_file():
        had = read_record(root)
        if had.get("members") != record["members"]:
            raise CowjaxError(f"{path}: a sweep of other members ({had.get('members')}); use "
                              f"another --workdir, or delete {root} to start again")
    else:
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    dirs = {}
    for name in members:
        dirs[name] = root / name
        dirs[name].mkdir(parents=True, exist_ok=True)
        for file in ("split.json", pipeline.template_path(root).name):
            if (root / file).is_file() and not (dirs[name] / file).is_file():
                with atomic_output(dirs[name] / file) as tmp:
                    shutil.copyfile(root / file, tmp)
    return dirs


def read_record(root) -> dict:
    path = Path(root) / RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CowjaxError(f"{path}: unreadable ({e})")


def member_dirs(root) -> dict[str, Path]:
    """{member name: workdir} of the sweep in ``root``, in order."""
    members = read_record(root).get("members")
    if not isinstance(members, dict) or not members:
        raise CowjaxError(f"{Path(root) / RECORD}: no members listed")
    return {name: Path(root) / name for name in members}


def stack(trees: list, xp=jnp):
    """Pytrees of one structure -> one, each leaf theirs stacked on a new leading axis (with
    ``xp.stack``: numpy for host arrays)."""
    return jax.tree.map(lambda *leaves: xp.stack(leaves), *trees)


def unstack(tree, k: int):
    """Member ``k``'s slice of a stacked pytree."""
    return jax.tree.map(lambda x: x[k], tree)
