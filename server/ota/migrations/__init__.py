"""Alembic migrations of the OTA service (shipped inside the wheel)."""
