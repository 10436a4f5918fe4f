"""Hash columns on the token and reference index tables (issue 14, lever 3): stable 64-bit hashes,
filled on write and by migration 0005 for rows written before, looked up through narrow indexes by hash
alone except where a collision would matter (identifiers, the Patient compartment: re-checked on the text)."""

from __future__ import annotations

import dataclasses
import importlib
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from fhir_norse.store import migrate
from fhir_norse.store.db import create_engine
from fhir_norse.store.rows import (
    ReferenceRow,
    TokenRow,
    identity_hash,
    index_hash,
    reference_target_hash,
    token_code_hash,
    token_system_code_hash,
)
from fhir_norse.store.search.engine import execute_search
from fhir_norse.store.search.request import CompartmentCriterion
from fhir_norse.store.storage import _row_values
from tests.server.search.search_helpers import Seeder, id_set, request, search, sqlite_engine

LOINC = "http://loinc.org"
lean = importlib.import_module("fhir_norse.store.migrations.versions.0005_lean_index")


def test_the_hash_is_stable_and_signed_64_bit() -> None:
    # Golden values: a stored hash must never change meaning between releases or processes.
    assert index_hash("Observation", "code") == 7090426069894896664
    assert token_system_code_hash("Observation", "code", LOINC, "1") == index_hash(
        "Observation", "code", "|", LOINC, "1"
    )
    assert token_system_code_hash("Observation", "code", None, "1") != token_system_code_hash(
        "Observation", "code", "", "1"
    )
    assert token_code_hash("Observation", "code", "1") != token_system_code_hash(
        "Observation", "code", None, "1"
    )
    assert reference_target_hash("Observation", "subject", None) is None
    for value in (index_hash(str(i)) for i in range(2000)):
        assert -(2**63) <= value < 2**63


@given(st.lists(st.one_of(st.none(), st.text()), min_size=1, max_size=5))
def test_the_migration_hashes_as_the_code_does(parts: list[str | None]) -> None:
    assert lean._hash(*parts) == index_hash(*parts)


def test_write_fills_the_hash_columns() -> None:
    token = _row_values(7, "Observation", TokenRow("code", LOINC, "1234-5", "weight"))
    assert token["hash_identity"] == identity_hash("Observation", "code")
    assert token["hash_code"] == token_code_hash("Observation", "code", "1234-5")
    assert token["hash_sys_code"] == token_system_code_hash("Observation", "code", LOINC, "1234-5")
    reference = _row_values(7, "Observation", ReferenceRow("subject", "Patient", "p1"))
    assert reference["hash_target"] == reference_target_hash("Observation", "subject", "p1")
    canonical = _row_values(
        7, "QuestionnaireResponse", ReferenceRow("questionnaire", None, None, url="http://q")
    )
    assert canonical["hash_target"] is None
    # Bounded columns are hashed as stored (a longer value is indexed by its prefix).
    long = _row_values(7, "Observation", TokenRow("code", None, "x" * 600))
    assert long["hash_code"] == token_code_hash("Observation", "code", "x" * 512)


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sa.Connection]:
    with sqlite_engine(tmp_path) as engine, engine.connect() as connection:
        yield connection


def _collide(conn: sa.Connection, pk: int, param: str, like: str, system: str | None = LOINC) -> None:
    """Give resource ``pk``'s ``param`` token row the hashes of value ``like``: a collision."""
    conn.execute(
        sa.text(
            "UPDATE idx_token SET hash_code = :c, hash_sys_code = :s WHERE resource_pk = :pk AND param = :p"
        ),
        {
            "c": token_code_hash("Observation", param, like),
            "s": token_system_code_hash("Observation", param, system, like),
            "pk": pk,
            "p": param,
        },
    )


def test_the_hash_finds_the_rows_and_identifiers_are_rechecked(conn: sa.Connection) -> None:
    """Equality is looked up by hash alone (the narrow index answers without reading the row), except
    where a collision would matter: identifiers (conditional operations act on them) are re-checked on
    the text, and so is the Patient compartment that limits a patient's searches."""
    seed = Seeder(conn)
    seed.add(
        "Observation",
        "a",
        TokenRow("code", LOINC, "1111-1"),
        TokenRow("identifier", "urn:x", "A"),
        ReferenceRow("subject", "Patient", "p1"),
    )
    b = seed.add(
        "Observation",
        "b",
        TokenRow("code", LOINC, "2222-2"),
        TokenRow("identifier", "urn:x", "B"),
        ReferenceRow("subject", "Patient", "p2"),
    )
    _collide(conn, b, "code", "1111-1")
    _collide(conn, b, "identifier", "A", "urn:x")
    conn.execute(
        sa.text("UPDATE idx_reference SET hash_target = :h WHERE resource_pk = :pk"),
        {"h": reference_target_hash("Observation", "subject", "p1"), "pk": b},
    )
    # The hash is what finds a row: b's code is now found by a's value, not by its own.
    assert id_set(search(conn, "Observation", "code=1111-1")) == {"a", "b"}
    assert id_set(search(conn, "Observation", "code=2222-2")) == set()
    assert id_set(search(conn, "Observation", "code:not=1111-1")) == set()
    assert id_set(search(conn, "Observation", "subject=p1")) == {"a", "b"}
    # A typed reference checks the type on the row.
    assert id_set(search(conn, "Observation", "subject=Group/p1")) == set()
    # Identifiers and the compartment re-check the text: the collision never matches.
    assert id_set(search(conn, "Observation", "identifier=urn:x|A")) == {"a"}
    assert id_set(search(conn, "Observation", "identifier=A")) == {"a"}
    compartment = request("Observation", "")
    limited = dataclasses.replace(
        compartment,
        criteria=(CompartmentCriterion("Observation", ("subject",), frozenset({"p1"})),),
    )
    assert id_set(execute_search(conn, limited)) == {"a"}


def test_sqlite_plans_equality_on_the_hash_indexes(conn: sa.Connection) -> None:
    seed = Seeder(conn)
    for i in range(50):
        seed.add(
            "Observation",
            f"o{i}",
            TokenRow("code", LOINC, str(i % 5)),
            ReferenceRow("subject", "Patient", f"p{i}"),
        )
    conn.exec_driver_sql("ANALYZE")
    from fhir_norse.store.search.engine import _page_select
    from tests.server.search.search_helpers import request

    for query, index in [
        (f"code={LOINC}|3", "ix_token_hash_sys_code"),
        ("code=3", "ix_token_hash_code"),
        ("subject=p7", "ix_reference_hash_target"),
    ]:
        statement, _ = _page_select(request("Observation", query), None)
        compiled = statement.compile(conn, compile_kwargs={"literal_binds": True})
        plan = " ".join(str(r[-1]) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}"))
        assert index in plan, (query, plan)


def test_migration_0005_fills_the_hashes_of_existing_rows(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'm.sqlite3'}")
    try:
        migrate.upgrade(engine, "0004")
        rng = random.Random(5)
        with engine.begin() as c:
            for pk in range(1, 1 + lean.BATCH + 7):  # more than one batch
                c.execute(
                    sa.text(
                        "INSERT INTO resource (pk, res_type, res_id, version, last_updated, deleted, body) "
                        "VALUES (:pk, 'Observation', :id, 1, '2026-01-01 00:00:00', 0, '{}')"
                    ),
                    {"pk": pk, "id": f"o{pk}"},
                )
                system = rng.choice([LOINC, None])
                c.execute(
                    sa.text(
                        "INSERT INTO idx_token (resource_pk, res_type, param, system, code) "
                        "VALUES (:pk, 'Observation', 'code', :s, :c)"
                    ),
                    {"pk": pk, "s": system, "c": str(pk % 97)},
                )
                c.execute(
                    sa.text(
                        "INSERT INTO idx_reference "
                        "(resource_pk, res_type, param, target_type, target_id, url) "
                        "VALUES (:pk, 'Observation', 'subject', :t, :i, :u)"
                    ),
                    {
                        "pk": pk,
                        "t": "Patient" if pk % 3 else None,
                        "i": f"p{pk % 11}" if pk % 3 else None,
                        "u": None if pk % 3 else "http://x",
                    },
                )
        migrate.upgrade(engine)
        with engine.connect() as c:
            tokens = c.execute(
                sa.text(
                    "SELECT res_type, param, system, code, hash_identity, hash_code, hash_sys_code "
                    "FROM idx_token"
                )
            ).all()
            assert len(tokens) == lean.BATCH + 7
            for rt, param, system, code, hi, hc, hs in tokens:
                assert (hi, hc, hs) == (
                    identity_hash(rt, param),
                    token_code_hash(rt, param, code),
                    token_system_code_hash(rt, param, system, code),
                )
            refs = c.execute(
                sa.text("SELECT res_type, param, target_id, hash_identity, hash_target FROM idx_reference")
            ).all()
            for rt, param, target_id, hi, ht in refs:
                assert (hi, ht) == (identity_hash(rt, param), reference_target_hash(rt, param, target_id))
            indexes = {r[1] for r in c.exec_driver_sql("PRAGMA index_list('idx_token')")}
            assert "ix_token_hash_code" in indexes and "ix_token_code" not in indexes
            assert id_set(search(c, "Observation", "code=5&_count=1000")) == {
                f"o{pk}" for pk in range(1, lean.BATCH + 8) if pk % 97 == 5
            }
        migrate.downgrade(engine, "0004")
        with engine.connect() as c:
            indexes = {r[1] for r in c.exec_driver_sql("PRAGMA index_list('idx_token')")}
            assert "ix_token_code" in indexes and "ix_token_hash_code" not in indexes
    finally:
        engine.dispose()
