"""Data: datasets and their splits, and safe image decoding."""
