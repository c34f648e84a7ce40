"""Training and evaluation input. :mod:`.builder` is the one way in: stores, loader settings, the world and a purpose
in; a :class:`~.builder.TrainInput` (epochs of batches, the loader's position) or an :class:`~.builder.EvalInput`
out. Beneath it: which rank reads what, in which order (:mod:`.sampler`, pure numpy), how row groups are read and
batched in background threads within a memory budget (:mod:`.reader`); augmentation is :mod:`dstrain.augment`'s."""
