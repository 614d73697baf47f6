"""Tests of ``model/``."""
