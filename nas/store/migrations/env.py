"""Alembic environment of the study store.

Run programmatically by ``Store`` (``config.attributes["connection"]`` is its open, locked
connection, already inside a transaction) or by the ``alembic`` command line with
``sqlalchemy.url`` set. The version table is ``nas_alembic_version`` and only ``nas_`` tables are
compared by autogenerate: the database also holds Optuna's tables and its ``alembic_version``,
which a plain autogenerate would propose to drop.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import Connection

from nas.store.models import VERSION_TABLE, Base

config = context.config
target_metadata = Base.metadata


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Autogenerate sees only our tables (Optuna's share the database)."""
    if type_ == "table":
        return name is not None and name.startswith("nas_")
    return True


OPTIONS: dict[str, Any] = {
    "target_metadata": target_metadata,
    "version_table": VERSION_TABLE,
    "include_name": include_name,
    "render_as_batch": True,  # SQLite cannot ALTER most things; batch mode copies the table
    "compare_type": True,
}


def _run(connection: Connection) -> None:
    context.configure(connection=connection, **OPTIONS)
    with context.begin_transaction():  # no-op when the caller's transaction is already open
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "", poolclass=pool.NullPool)
    with engine.connect() as conn:
        _run(conn)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
