"""Corpus importers and feature-store writing."""
