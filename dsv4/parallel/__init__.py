"""Parallelism applied to the single-device model from outside."""
