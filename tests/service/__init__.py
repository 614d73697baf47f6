"""Tests of ``service/``."""
