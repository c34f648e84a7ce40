"""Corpus importers: each turns a corpus layout into DeepSpeech CSVs."""
