"""cowjax entry point: train, evaluate, predict, register, run the ablation or benchmark.

  python launch.py --config=configs/demo.py --workdir=runs/demo             # train, then test
  python launch.py --mode=ablate --config=configs/demo.py --workdir=runs/ablation --seeds=3
  python launch.py --config=configs/demo.py --workdir=runs/sweep \
      --config.sweep.weighting="('fixed','uncertainty','dwa','gradnorm')"   # trained together
  python launch.py --mode=predict --input=IMG --output=OUT.mrk.json      # the ready model
  python launch.py --mode=predict --workdir=runs/demo --input=IMG --output=OUT.mrk.json
  python launch.py --mode=export --workdir=runs/long --output=models/ready  # what predict needs
  python launch.py --mode=export --workdir=runs/a,runs/b --output=DIR   # predicted as one ensemble
  python launch.py --mode=eval --workdir=runs/demo --data_dir=CASES
  python launch.py --mode=eval --workdir=runs/demo --decode=argmax --tta=none --norefine \
      --presence=network                                                    # as the paper
  python launch.py --mode=register --workdir=runs/demo --fixed=A.nii.gz --moving=B.nii.gz \
      --output=B_on_A.nii.gz
  python launch.py --mode=bench --config=configs/paper.py

``--mode=ablate`` trains the paper's four loss settings (heatmap_only, seg, seg_attr, full) for each
seed, each a run under the workdir, evaluates them on the same test cases (``--data_dir``: on those
cases) and writes the comparison there (``cowjax/ablation.py``); started again it skips what is done.
A config with ``config.sweep`` set trains its members as one program, each a run in
``<workdir>/member_<k>`` (``cowjax/training/sweep.py``); ``--mode=eval`` on the sweep's workdir
compares them in one report, as the ablation's.
Several processes train one run when each is started with ``--coordinator=HOST:PORT
--num_processes=N --process_id=I`` (README, "Devices").

Everything worth testing lives in ``cowjax``; this file parses flags and makes one call. On Linux it
first restarts itself with glibc's malloc on transparent huge pages (``cowjax/huge_pages.py``;
``COWJAX_HUGE_PAGES=0`` turns that off).
A user's mistake (a bad path, a broken file) is printed as one line and exits with status 2.
"""

import os
import re
import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cowjax import huge_pages

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config "
                               "(predict: models/ready when not given). "
                               "For --mode=eval, a comma-separated list compares runs, and a "
                               "sweep's directory its members; for --mode=export, a list "
                               "makes one ensemble.")
_MODE = flags.DEFINE_enum("mode", "train",
                          ["train", "eval", "predict", "register", "ablate", "bench", "export"],
                          "What to do.")
# The model shipped with the repository (models/ready/MODEL.md): --mode=predict without --workdir.
READY_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "ready")
_INPUT = flags.DEFINE_string("input", None, "predict: an image, or a directory of cases/images.")
_OUTPUT = flags.DEFINE_string("output", None, "predict, register, export: output file or "
                              "directory.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "eval, ablate: cases with ground truth "
                                "(default: the run's own test split).")
_SEEDS = flags.DEFINE_integer("seeds", 3, "ablate: seeds per arm (at least 1).")
_SAVE_SEG = flags.DEFINE_bool("save_segmentation", False, "predict: also write segment labels.")
_FIGURE = flags.DEFINE_bool("figure", False, "predict: also write a PNG of the image's MIPs with "
                            "the predicted landmarks (and segments with --save_segmentation).")
_EVAL = flags.DEFINE_bool("eval", True, "train: evaluate the best checkpoints on the test split "
                          "after training (--noeval: stop after training).")
_WINDOWS = flags.DEFINE_integer("windows_per_call", 0, "predict, eval: inference windows per "
                                "network call (0: one per CPU device, 8 on an accelerator; more "
                                "is faster on a large accelerator, less needs less memory).")
_DECODE = flags.DEFINE_enum("decode", "quadratic", ["quadratic", "argmax", "soft"],
                            "predict, eval: how heatmaps are read ('argmax': as the paper; "
                            "'quadratic': argmax and a sub-voxel fit).")
_TTA = flags.DEFINE_enum("tta", "default", ["default", "none"],
                         "predict, eval: test-time augmentation ('default': the mirror image and "
                         "the refinement stage's shifted patches; 'none': as the paper).")
_REFINE = flags.DEFINE_bool("refine", True, "predict, eval: use the run's refinement stage where "
                            "it has one (--norefine: the first network alone, as the paper).")
_ALIGN = flags.DEFINE_bool("align", True, "predict, eval: for a run that does not register its "
                          "images, place the windows on a grid aligned to the template by the "
                          "landmarks found in the search for the circle, and read each "
                          "landmark's heatmap within 30 mm of the template fitted there "
                          "(--noalign: on the image's own axes, each heatmap read whole).")
_PRESENCE = flags.DEFINE_enum("presence", "image", ["image", "network"],
                              "predict, eval: where the variable segments' presence comes from "
                              "('image': the lumen between the predicted landmarks; 'network': "
                              "the segment attribute branch, as the paper). ablate and a sweep's "
                              "eval: always the network.")
_FIXED = flags.DEFINE_string("fixed", None, "register: the fixed image.")
_MOVING = flags.DEFINE_string("moving", None, "register: the moving image.")
_FIXED_LM = flags.DEFINE_string("fixed_landmarks", None, "register: landmarks of the fixed image.")
_MOVING_LM = flags.DEFINE_string("moving_landmarks", None, "register: landmarks of the moving image.")
_TRANSFORM = flags.DEFINE_enum("transform", "rigid", ["rigid", "similarity"], "register: model.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "train, eval, predict with several "
                                   "processes: HOST:PORT of the first process (with "
                                   "--num_processes and --process_id; jax.distributed.initialize).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "the number of processes (see "
                                      "--coordinator).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0 for the first "
                                   "(see --coordinator).")
_PARTS = flags.DEFINE_list("parts", ["model", "step", "inference", "pipeline", "synthetic", "memory"],
                           "bench: which parts to measure.")


def _run() -> None:
    mode, workdir, config = _MODE.value, _WORKDIR.value, _CONFIG.value
    if _WINDOWS.value < 0:
        raise _usage(f"--windows_per_call={_WINDOWS.value} must be 0 (default) or positive")
    from cowjax import devices
    devices.WINDOWS_PER_CALL = _WINDOWS.value
    _start_processes(mode, config)
    if config is not None:
        from cowjax import config_check
        config_check.validate(config)
        config.lock()  # from here on a mistyped field is an error, not a new setting
    if mode == "train":
        if config is None or workdir is None:
            raise _usage("--mode=train needs --config and --workdir")
        from cowjax.training import train
        train.train_and_evaluate(config, workdir)
        if _EVAL.value and _first_process_alone():
            _evaluate([workdir], data_dir=None)
    elif mode == "eval":
        if workdir is None:
            raise _usage("--mode=eval needs --workdir")
        if _first_process_alone():
            _evaluate(workdir.split(","), data_dir=_DATA_DIR.value)
    elif mode == "predict":
        if not (_INPUT.value and _OUTPUT.value):
            raise _usage("--mode=predict needs --input and --output (and --workdir, or the ready "
                         "model in models/ready)")
        workdir = workdir or READY_MODEL
        from cowjax.inference import predict
        if not _first_process_alone():
            return
        predict.run_predict(workdir, _INPUT.value, _OUTPUT.value,
                            save_segmentation=_SAVE_SEG.value, figure=_FIGURE.value,
                            **_inference_flags())
    elif mode == "register":
        if not (_FIXED.value and _MOVING.value and _OUTPUT.value):
            raise _usage("--mode=register needs --fixed, --moving and --output")
        from cowjax.inference import register
        register.run_register(workdir, _FIXED.value, _MOVING.value, _OUTPUT.value,
                         transform=_TRANSFORM.value, fixed_landmarks=_FIXED_LM.value,
                         moving_landmarks=_MOVING_LM.value)
    elif mode == "ablate":
        if config is None or workdir is None:
            raise _usage("--mode=ablate needs --config and --workdir")
        from cowjax import ablation
        ablation.run_ablation(config, workdir, seeds=_SEEDS.value, data_dir=_DATA_DIR.value,
                              command=shlex.join(["python", *sys.argv]))
    elif mode == "export":
        if not (workdir and _OUTPUT.value):
            raise _usage("--mode=export needs --workdir and --output")
        from cowjax.training import checkpoint
        runs = workdir.split(",")
        if len(runs) > 1:
            checkpoint.export_ensemble(runs, _OUTPUT.value)
            print(f"{_OUTPUT.value}: an ensemble of {len(runs)} runs' best checkpoints "
                  f"({', '.join(runs)}), predicted as one")
        else:
            stages = checkpoint.export_for_inference(workdir, _OUTPUT.value)
            print(f"{_OUTPUT.value}: the best checkpoint of {workdir}"
                  + (" and of its refinement stage" if len(stages) > 1 else ""))
    elif mode == "bench":
        if config is None:
            raise _usage("--mode=bench needs --config")
        from cowjax import bench
        bench.run_bench(config, parts=_PARTS.value)


def _start_processes(mode, config) -> None:
    """Join a run of several processes when asked: by --coordinator, --num_processes and
    --process_id, or (``config.train.distributed``) by what JAX finds in a cluster's environment.
    Training splits each batch over every process's devices; evaluation and prediction run on the
    first process (``_first_process_alone``)."""
    given = [f for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID) if f.value is not None]
    distributed = config is not None and config.train.distributed
    if not given and not distributed:
        return
    if given and len(given) < 3:
        missing = [f"--{f.name}" for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)
                   if f.value is None]
        raise _usage(f"several processes need --coordinator, --num_processes and --process_id "
                     f"(missing {', '.join(missing)})")
    if given and not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
        raise _usage(f"--process_id={_PROCESS_ID.value} must be in 0..{_NUM_PROCESSES.value - 1}")
    if mode not in ("train", "eval", "predict"):
        raise _usage(f"--mode={mode} runs in one process (several: train, eval, predict)")
    from cowjax import devices
    devices.start_processes(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def _first_process_alone() -> bool:
    """With several processes: leave their run (the others exit) and say whether this is the
    first, which then evaluates or predicts on its own devices. One process: True."""
    import jax
    from cowjax import devices
    if jax.process_count() == 1:
        return True
    first = jax.process_index() == 0
    devices.stop_processes()
    return first


def _evaluate(workdirs, data_dir) -> None:
    """Evaluate runs (several: also compared), or a sweep's members compared."""
    from cowjax.training import sweep
    if len(workdirs) == 1 and sweep.is_sweep_dir(workdirs[0]):
        from cowjax import ablation
        ablation.evaluate_sweep(workdirs[0], data_dir, command=shlex.join(["python", *sys.argv]),
                                **_inference_flags())
    else:
        from cowjax.inference import evaluate
        evaluate.run_eval(workdirs, data_dir=data_dir, **_inference_flags())


def _inference_flags() -> dict:
    return {"tta": _TTA.value == "default", "decode_method": _DECODE.value,
            "refine": _REFINE.value, "presence": _PRESENCE.value, "align": _ALIGN.value}


def _usage(message):
    from cowjax.errors import CowjaxError
    return CowjaxError(message)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from cowjax import devices
    from cowjax.errors import CowjaxError
    devices.use_cpu_cores()  # on a CPU, one JAX device per core: see cowjax/devices.py
    logging.set_verbosity(logging.WARNING)
    try:
        _run()
    except CowjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _parse_flags(argv):
    """absl's parser, but a bad flag or config file is one line (config_flags would embed the
    config file's traceback in its message)."""
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[-1] if len(lines) > 1 else ""
        print(f"error: {lines[0]} {detail}".rstrip(), file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a field not there
        text = str(e)
        field = re.search(r'instead of "(\w+)"', text) or re.search(r"(\w+)", text)
        field = field.group(1) if field else ""
        override = next((a.split("=")[0] for a in argv if a.startswith("--config.")
                         and a.split("=")[0].endswith("." + field)), "--config")
        hint = re.search(r'Did you mean "\w+" instead of "\w+"\?', text)
        hint = hint.group(0) if hint else ""
        print(f"error: {override}: the config has no such field" + (f" ({hint})" if hint else ""),
              file=sys.stderr)
        sys.exit(2)
    if flags.FLAGS["config"].present:
        # "configs/x.py:arg" names the file configs/x.py, called with "arg".
        path = config_flags.get_config_filename(flags.FLAGS["config"]).partition(":")[0]
        if not os.path.isfile(path):
            print(f"error: --config: {path} does not exist", file=sys.stderr)
            sys.exit(2)
    return rest


if __name__ == "__main__":
    huge_pages.restart_with_huge_pages()   # XLA's per-call CPU memory in 2 MB pages (a restart)
    app.run(main, flags_parser=_parse_flags)
