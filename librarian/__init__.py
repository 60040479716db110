"""Librarian: a data-versioned, reproducible pipeline that trains a small GPT on TinyStories."""

__version__ = "0.1.0"
