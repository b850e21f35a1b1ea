"""Training: the plain-dict state and optimizer (``state``), orbax checkpoints (``checkpoint``),
the data-parallel train loop with resume (``train.train_and_evaluate``)."""
