"""DeepSpeech-compatible CTC decoding (scorer packages, beam search)."""
