"""``python -m service`` runs the oclust CLI."""

from service.cli import app

app()
