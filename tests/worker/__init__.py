"""Tests of ``training_worker/``."""
