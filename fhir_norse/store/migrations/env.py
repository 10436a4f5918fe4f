"""Alembic environment: runs with the connection handed over by :mod:`fhir_norse.store.migrate`."""

from __future__ import annotations

from alembic import context

from fhir_norse.store.tables import METADATA

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - only the programmatic entry point is supported
    raise RuntimeError("run migrations through `fhir-norse migrate`")

context.configure(connection=connection, target_metadata=METADATA, render_as_batch=True, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
