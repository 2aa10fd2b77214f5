"""Alembic's entry point: run the migrations on the connection `lineguard.db.upgrade` hands over (it holds the
lock and the transaction), or, for `alembic` run by hand, on `sqlalchemy.url`."""

from alembic import context
from sqlalchemy import create_engine

config = context.config


def run(connection) -> None:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.begin() as conn:
        run(conn)
    engine.dispose()
