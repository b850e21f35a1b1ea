"""``python -m cowjax.data.synthetic OUT_DIR --num N ...``: see ``dataset.main``."""

import sys

from cowjax.data.synthetic.dataset import main

if __name__ == "__main__":
    sys.exit(main())
