"""Alembic migrations of the records database (see lineguard/db.py); `lineguard db upgrade` applies them."""
