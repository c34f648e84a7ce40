"""Corpus importers (DeepSpeech CSVs) and preprocessing into feature stores (:mod:`.pipeline`)."""
