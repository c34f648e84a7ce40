"""Training: the Horovod loop (:mod:`.trainer`), checkpoints and what to load before training (:mod:`.checkpoint`),
the learning-rate schedule and stopping decisions (:mod:`.schedule`), DeepSpeech release import. Nothing outside
this package imports it: the run directory (:mod:`dstrain.rundir`), the run record (:mod:`dstrain.record`) and model
loading (:mod:`dstrain.inference`) sit below it."""
