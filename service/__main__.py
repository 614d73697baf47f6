"""``python -m oclust`` runs the oclust CLI."""

from oclust.service.cli import app

app()
