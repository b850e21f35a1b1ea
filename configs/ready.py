"""The recipe of the ready model in ``models/ready``: ``configs/long.py`` on twice the subjects,
trained twice as long.

  python launch.py --config=configs/ready.py --workdir=runs/ready
  python launch.py --mode=export --workdir=runs/ready --output=models/ready

Everything but the amount of data and training is the demo's (``configs/demo.py``): 640 synthetic
cases (the first 320 are ``configs/long.py``'s, split otherwise), the first network 10000 steps of
batch 2 and the refinement stage 10000 steps of batch 4, validated and checkpointed every 500
steps. On a 2-core CPU it takes about an hour (2026-12-06: 59 min 40 s on an AMD EPYC with AVX-512,
62 min 13 s on an Intel Xeon with AVX-512 beside other jobs; peak memory 3.1-3.6 GB).

The seed is 1. The recipe was trained with seeds 0 and 1, each judged by a rule set before
measuring (BENCHMARKS.md, 2026-12-06): seed 0 beat ``configs/long.py`` on nine held-out sets of the
independent generator (MRE 1.78 against 2.05 mm) but scored 1.26 mm on the real crop, over the
1.25 mm the rule allowed; seed 1 scored 1.84 mm and 1.17 mm and is the one shipped.
"""

from configs import long


def get_config(arg: str = ""):
    if arg:
        raise ValueError(f"configs/ready.py: takes no argument (got {arg!r}); the ablations are "
                         "configs/demo.py's")
    c = long.get_config()
    c.update_from_flattened_dict({"data.num_cases": 640, "num_train_steps": 10000,
                                  "refine.num_train_steps": 10000, "seed": 1})
    return c
