"""Alembic migrations of the study database."""
