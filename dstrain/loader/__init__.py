"""Training input: which rank reads what (:mod:`.sampler`), how it is read and batched (:mod:`.pipeline`), and what
augmentation does to it on the way (:mod:`.augment`). Pure numpy except :mod:`.pipeline` (tf.data)."""
