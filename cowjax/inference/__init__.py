"""Checkpoints -> predictions and reports: ``predictor`` (one image; with ``windows`` and the
refinement stage, ``refiner``), ``segment`` (labels on the image's grid), and the commands that
use them: ``predict`` (``--mode=predict``: files in, files out), ``evaluate`` (``--mode=eval``:
scores and figures), ``register`` (``--mode=register``: two images aligned by their landmarks)."""
