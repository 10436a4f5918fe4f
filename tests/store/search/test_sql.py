"""Search against real index tables on SQLite and PostgreSQL (https://hl7.org/fhir/R4/search.html).

Index rows are inserted by hand (see ``search_helpers``) so the expectations here are only
about the query side: matching per type, modifier and prefix, chains, sorting, keyset
paging, includes and totals.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from fhir_norse.outcomes import BadRequest
from fhir_norse.server.search.links import page_query
from fhir_norse.server.search.parse import parse_search
from fhir_norse.store.rows import (
    CompositeRow,
    DateRow,
    IndexRow,
    NumberRow,
    ReferenceRow,
    StringRow,
    TokenRow,
    UriRow,
)
from fhir_norse.store.search import engine as search_engine
from fhir_norse.store.search.engine import execute_search, find_matching
from fhir_norse.store.search.values import date_range, decimal_range, normalize_string
from tests.server.search.search_helpers import (
    PG_URL,
    Seeder,
    body,
    id_set,
    ids,
    postgres_engine,
    request,
    search,
    sqlite_engine,
)

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


@pytest.fixture(
    scope="module",
    params=[
        "sqlite",
        pytest.param(
            "postgres", marks=pytest.mark.skipif(not PG_URL, reason="set FHIR_NORSE_TEST_POSTGRES_URL")
        ),
    ],
)
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[sa.Engine]:
    if request.param == "sqlite":
        with sqlite_engine(tmp_path_factory.mktemp("search")) as e:
            yield e
    else:
        assert PG_URL
        with postgres_engine(PG_URL) as e:
            yield e


@pytest.fixture
def conn(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A connection whose work is rolled back after the test."""
    with engine.connect() as connection:
        transaction = connection.begin()
        try:
            yield connection
        finally:
            transaction.rollback()


@pytest.fixture
def seed(conn: sa.Connection) -> Seeder:
    return Seeder(conn)


def tok(param: str, code: str | None, system: str | None = None, text: str | None = None) -> TokenRow:
    return TokenRow(param, system, code, normalize_string(text) if text else None)


def string(param: str, text: str) -> StringRow:
    return StringRow(param, normalize_string(text), text)


def date(param: str, value: str, end: str | None = None) -> DateRow:
    low, high = date_range(value)
    if end is not None:
        high = date_range(end)[1]
    return DateRow(param, low, high)


def num(
    param: str, value: str, system: str | None = None, code: str | None = None, unit: str | None = None
) -> NumberRow:
    number = Decimal(value)
    return NumberRow(param, number, *decimal_range(number), system=system, code=code, unit=unit)


def ref(param: str, target: str) -> ReferenceRow:
    rtype, _, rid = target.partition("/")
    return ReferenceRow(param, rtype, rid)


# --- token ----------------------------------------------------------------------------------------


def test_token_code_system_and_modifiers(conn: sa.Connection, seed: Seeder) -> None:
    seed.add("Observation", "a", tok("code", "1234-5", LOINC, "Body weight"), tok("status", "final"))
    seed.add("Observation", "b", tok("code", "1234-5", "http://other"), tok("status", "final"))
    seed.add("Observation", "c", tok("code", "1234-5"), tok("status", "amended"))
    seed.add("Observation", "d", tok("code", "9999-9", LOINC, "Héart rate"))
    seed.add("Observation", "e")  # no code at all

    assert id_set(search(conn, "Observation", "code=1234-5")) == {"a", "b", "c"}
    assert id_set(search(conn, "Observation", f"code={LOINC}|1234-5")) == {"a"}
    assert id_set(search(conn, "Observation", "code=|1234-5")) == {"c"}
    assert id_set(search(conn, "Observation", f"code={LOINC}|")) == {"a", "d"}
    assert id_set(search(conn, "Observation", "code=1234-5,9999-9")) == {"a", "b", "c", "d"}
    # Repetition is AND.
    assert id_set(search(conn, "Observation", "code=1234-5&status=final")) == {"a", "b"}
    # :not also returns resources without the element.
    assert id_set(search(conn, "Observation", f"code:not={LOINC}|1234-5")) == {"b", "c", "d", "e"}
    assert id_set(search(conn, "Observation", "code:not=1234-5,9999-9")) == {"e"}
    # :text is a starts-with on the folded display, case and accent insensitive.
    assert id_set(search(conn, "Observation", "code:text=HEART")) == {"d"}
    assert id_set(search(conn, "Observation", "code:text=body%20w")) == {"a"}
    assert id_set(search(conn, "Observation", "code:text=weight")) == set()
    assert id_set(search(conn, "Observation", "code:missing=true")) == {"e"}
    assert id_set(search(conn, "Observation", "code:missing=false")) == {"a", "b", "c", "d"}
    assert id_set(search(conn, "Observation", "status:missing=true")) == {"d", "e"}


def test_escaped_comma_is_part_of_the_value(conn: sa.Connection, seed: Seeder) -> None:
    seed.add("Observation", "a", tok("identifier", "x,y", "urn:s"))
    seed.add("Observation", "b", tok("identifier", "x", "urn:s"))
    assert id_set(search(conn, "Observation", r"identifier=urn:s|x\,y")) == {"a"}
    assert id_set(search(conn, "Observation", "identifier=urn:s|x,y")) == {"b"}


# --- string ---------------------------------------------------------------------------------------


def test_string_default_exact_contains_missing(conn: sa.Connection, seed: Seeder) -> None:
    seed.add("Patient", "1", string("family", "Müller"), string("given", "Anna"))
    seed.add("Patient", "2", string("family", "Mueller"))
    seed.add("Patient", "3", string("family", "Smith-Müll"), string("given", "100%_sure"))
    seed.add("Patient", "4")

    assert id_set(search(conn, "Patient", "family=muller")) == {"1"}
    assert id_set(search(conn, "Patient", "family=MÜL")) == {"1"}
    assert id_set(search(conn, "Patient", "family=mu")) == {"1", "2"}
    assert id_set(search(conn, "Patient", "family:exact=Müller")) == {"1"}
    assert id_set(search(conn, "Patient", "family:exact=muller")) == set()
    assert id_set(search(conn, "Patient", "family:contains=mull")) == {"1", "3"}
    assert id_set(search(conn, "Patient", "family:missing=true")) == {"4"}
    # LIKE wildcards in the value are literal.
    assert id_set(search(conn, "Patient", "given=100%25_")) == {"3"}
    assert id_set(search(conn, "Patient", "given=a%25")) == set()
    assert id_set(search(conn, "Patient", "family=smith,mueller")) == {"2", "3"}


# --- date -----------------------------------------------------------------------------------------


def test_date_prefixes(conn: sa.Connection, seed: Seeder) -> None:
    seed.add("Observation", "day", date("date", "2024-03-10"))
    seed.add("Observation", "instant", date("date", "2024-03-10T10:30:00Z"))
    seed.add("Observation", "period", date("date", "2024-03-09", "2024-03-11"))
    seed.add("Observation", "open", DateRow("date", datetime(2024, 3, 12), None))
    seed.add("Observation", "later", date("date", "2024-05-01"))
    seed.add("Observation", "none")

    def q(value: str) -> set[str]:
        return id_set(search(conn, "Observation", f"date={value}"))

    assert q("2024-03-10") == {"day", "instant"}
    assert q("eq2024-03") == {"day", "instant", "period"}
    assert q("2024") == {"day", "instant", "period", "later"}
    assert q("ne2024-03-10") == {"period", "open", "later"}
    assert q("gt2024-03-10") == {"period", "open", "later"}
    assert q("lt2024-03-10") == {"period"}
    assert q("ge2024-03-10") == {"day", "instant", "period", "open", "later"}
    assert q("le2024-03-10") == {"day", "instant", "period"}
    assert q("sa2024-03-10") == {"open", "later"}
    assert q("eb2024-03-10") == set()
    assert q("eb2024-03-12") == {"day", "instant", "period"}
    assert q("2024-03-10T10:30") == {"instant"}
    assert q("2024-03-10T11:30%2B01:00") == {"instant"}
    assert q("gt2024-03-10T10:00Z,lt2024-03-01") == {"day", "instant", "period", "open", "later"}
    assert id_set(search(conn, "Observation", "date=ge2024-03-10&date=lt2024-04")) == {
        "day",
        "instant",
        "period",
        "open",
    }
    assert id_set(search(conn, "Observation", "date:missing=true")) == {"none"}


def test_date_approximately(conn: sa.Connection, seed: Seeder) -> None:
    now = datetime(2024, 12, 31)
    seed.add("Observation", "near", date("date", "2024-01-20"))
    seed.add("Observation", "far", date("date", "2023-03-01"))
    # 2024-01-10 is ~355 days before now: the search range is widened by ~35 days.
    assert id_set(search(conn, "Observation", "date=ap2024-01-10", now=now)) == {"near"}
    assert id_set(search(conn, "Observation", "date=ap2023-01-10", now=now)) == {"far"}


def test_last_updated_and_id(conn: sa.Connection, seed: Seeder) -> None:
    seed.add("Patient", "p1", last_updated=datetime(2024, 1, 1, 8))
    seed.add("Patient", "p2", last_updated=datetime(2024, 1, 2, 8))
    seed.add("Patient", "p3", last_updated=datetime(2024, 1, 3, 8))
    assert id_set(search(conn, "Patient", "_lastUpdated=2024-01-02")) == {"p2"}
    assert id_set(search(conn, "Patient", "_lastUpdated=gt2024-01-01")) == {"p2", "p3"}
    assert id_set(search(conn, "Patient", "_lastUpdated=le2024-01-02")) == {"p1", "p2"}
    assert id_set(search(conn, "Patient", "_lastUpdated=sa2024-01-02T07:00:00")) == {"p2", "p3"}
    assert id_set(search(conn, "Patient", "_id=p1,p3")) == {"p1", "p3"}
    assert id_set(search(conn, "Patient", "_id=p1&_id=p2")) == set()
    assert id_set(search(conn, "Patient", "_id:missing=false")) == {"p1", "p2", "p3"}


# --- number and quantity --------------------------------------------------------------------------


def test_number_and_quantity(conn: sa.Connection, seed: Seeder) -> None:
    seed.add("Observation", "w100", num("value-quantity", "100", UCUM, "kg", "kg"))
    seed.add("Observation", "w100.4", num("value-quantity", "100.4", UCUM, "kg", "kilogram"))
    seed.add("Observation", "w101", num("value-quantity", "101", "http://other", "kg", "kg"))
    seed.add("Observation", "g5.4", num("value-quantity", "5.4", UCUM, "mg", "mg"))
    seed.add("Observation", "nil")

    def q(value: str) -> set[str]:
        return id_set(search(conn, "Observation", f"value-quantity={value}"))

    # 100 stands for [99.5, 100.5); 100.0 for [99.95, 100.05).
    assert q("100") == {"w100", "w100.4"}
    assert q("100.0") == {"w100"}
    # One significant figure: 1e2 stands for [50, 150).
    assert q("1e2") == {"w100", "w100.4", "w101"}
    assert q("ne100") == {"w101", "g5.4"}
    assert q("gt100") == {"w100.4", "w101"}
    assert q("ge100") == {"w100", "w100.4", "w101"}
    assert q("lt100.4") == {"w100", "g5.4"}
    assert q("le100.4") == {"w100", "w100.4", "g5.4"}
    assert q("sa100") == {"w101"}
    assert q("eb100") == {"g5.4"}
    # ap: within 10% of the value.
    assert q("ap95") == {"w100", "w100.4", "w101"}
    assert q("ap91") == {"w100"}
    assert q(f"100|{UCUM}|kg") == {"w100", "w100.4"}
    assert q("gt100||kg") == {"w100.4", "w101"}
    # ``||code`` also matches the human unit.
    assert q("100||kilogram") == {"w100.4"}
    assert q(f"100|{UCUM}|g") == set()
    assert q("5.4,101") == {"g5.4", "w101"}
    assert id_set(search(conn, "Observation", "value-quantity:missing=true")) == {"nil"}


# --- reference ------------------------------------------------------------------------------------


def test_reference_forms(conn: sa.Connection, seed: Seeder) -> None:
    seed.add("Observation", "o1", ref("subject", "Patient/123"), ref("patient", "Patient/123"))
    seed.add("Observation", "o2", ref("subject", "Group/123"))
    seed.add("Observation", "o3", ref("subject", "Patient/456"))
    seed.add(
        "Observation",
        "o4",
        ReferenceRow("subject", "Patient", "789", url="http://other.org/fhir/Patient/789"),
    )
    seed.add("Observation", "o5")

    def q(query: str) -> set[str]:
        return id_set(search(conn, "Observation", query))

    assert q("subject=123") == {"o1", "o2"}
    assert q("subject=Patient/123") == {"o1"}
    assert q("subject:Patient=123") == {"o1"}
    assert q("subject:Group=123") == {"o2"}
    assert q("subject=Patient/123,Patient/456") == {"o1", "o3"}
    assert q("patient=123") == {"o1"}
    assert q("subject=http://other.org/fhir/Patient/789") == {"o4"}
    # An absolute URL ending in Type/id also finds the local reference.
    assert q("subject=http://this.server/fhir/Patient/456") == {"o3"}
    assert q("subject:missing=true") == {"o5"}
    with pytest.raises(BadRequest, match="cannot refer"):
        search(conn, "Observation", "patient=Practitioner/1")


def test_canonical_reference(conn: sa.Connection, seed: Seeder) -> None:
    url = "http://x.org/Questionnaire/phq9"
    seed.add(
        "QuestionnaireResponse",
        "r1",
        ReferenceRow("questionnaire", None, None, url=url, canonical_version="1.0"),
    )
    seed.add(
        "QuestionnaireResponse",
        "r2",
        ReferenceRow("questionnaire", None, None, url=url, canonical_version="2.0"),
    )
    seed.add("QuestionnaireResponse", "r3", ReferenceRow("questionnaire", None, None, url=url))
    seed.add("QuestionnaireResponse", "r4", ReferenceRow("questionnaire", None, None, url=url + "-short"))
    assert id_set(search(conn, "QuestionnaireResponse", f"questionnaire={url}|1.0")) == {"r1"}
    assert id_set(search(conn, "QuestionnaireResponse", f"questionnaire={url}")) == {"r1", "r2", "r3"}


# --- uri ------------------------------------------------------------------------------------------


def test_uri_exact_below_above(conn: sa.Connection, seed: Seeder) -> None:
    seed.add("Questionnaire", "q1", UriRow("url", "http://acme.org/fhir/Questionnaire/phq9"))
    seed.add("Questionnaire", "q2", UriRow("url", "http://acme.org/fhir/Questionnaire/gad7"))
    seed.add("Questionnaire", "q3", UriRow("url", "http://acme.org/fhir"))
    seed.add("Questionnaire", "q4", UriRow("url", "http://acme.org/fhir/Questionnaire/phq9/_history/2"))
    seed.add("Questionnaire", "q5")

    def q(query: str) -> set[str]:
        return id_set(search(conn, "Questionnaire", query))

    assert q("url=http://acme.org/fhir/Questionnaire/phq9") == {"q1"}
    assert q("url:below=http://acme.org/fhir/Questionnaire") == {"q1", "q2", "q4"}
    assert q("url:above=http://acme.org/fhir/Questionnaire/phq9/_history/2") == {"q1", "q3", "q4"}
    assert q("url:missing=true") == {"q5"}


# --- composite and common parameters --------------------------------------------------------------


def test_composite_code_value_quantity(conn: sa.Connection, seed: Seeder) -> None:
    def comp(code: str, value: str, unit: str = "mg") -> CompositeRow:
        low, high = decimal_range(Decimal(value))
        return CompositeRow(
            "code-value-quantity", LOINC, code, c2_system=UCUM, c2_code=unit, c2_low=low, c2_high=high
        )

    seed.add("Observation", "o1", comp("1234-5", "6"))
    seed.add("Observation", "o2", comp("1234-5", "5"))
    seed.add("Observation", "o3", comp("9999-9", "6"))
    seed.add("Observation", "o4", comp("1234-5", "7", "g"))
    seed.add(
        "Observation",
        "o5",
        CompositeRow("code-value-string", LOINC, "1234-5", c2_string=normalize_string("Positive result")),
    )

    def q(query: str) -> set[str]:
        return id_set(search(conn, "Observation", query))

    assert q(f"code-value-quantity={LOINC}|1234-5$gt5.4|{UCUM}|mg") == {"o1"}
    assert q("code-value-quantity=1234-5$gt5.4") == {"o1", "o4"}
    assert q("code-value-quantity=1234-5$5") == {"o2"}
    assert q("code-value-quantity=1234-5$lt5.5,9999-9$6") == {"o2", "o3"}
    assert q("code-value-string=1234-5$posit") == {"o5"}
    assert q("code-value-quantity:missing=true") == {"o5"}


def test_tag_profile_security_source(conn: sa.Connection, seed: Seeder) -> None:
    seed.add(
        "Patient",
        "p1",
        tok("_tag", "test", "http://tags"),
        tok("_security", "R", "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"),
        UriRow("_profile", "http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"),
        UriRow("_source", "http://ehr.example/fhir"),
    )
    seed.add("Patient", "p2", tok("_tag", "prod", "http://tags"))
    assert id_set(search(conn, "Patient", "_tag=http://tags|test")) == {"p1"}
    assert id_set(search(conn, "Patient", "_tag:not=test")) == {"p2"}
    assert id_set(search(conn, "Patient", "_security=R")) == {"p1"}
    assert id_set(
        search(conn, "Patient", "_profile=http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient")
    ) == {"p1"}
    assert id_set(search(conn, "Patient", "_source:below=http://ehr.example")) == {"p1"}


# --- chaining and _has ----------------------------------------------------------------------------


def _chain_world(seed: Seeder) -> None:
    seed.add("Patient", "p1", tok("identifier", "123", "urn:mrn"), string("name", "Anna Berg"))
    seed.add("Patient", "p2", tok("identifier", "456", "urn:mrn"), string("name", "Bo Lund"))
    seed.add("Practitioner", "d1", string("name", "Anna Doctor"))
    seed.add(
        "Observation",
        "o1",
        ref("subject", "Patient/p1"),
        ref("patient", "Patient/p1"),
        tok("code", "1234-5", LOINC),
        tok("identifier", "obs-1", "urn:obs"),
    )
    seed.add(
        "Observation",
        "o2",
        ref("subject", "Patient/p2"),
        ref("patient", "Patient/p2"),
        tok("code", "1234-5", LOINC),
    )
    seed.add(
        "Observation",
        "o3",
        ref("subject", "Patient/p2"),
        ref("patient", "Patient/p2"),
        tok("code", "9999-9", LOINC),
    )
    seed.add("Observation", "o4", ref("performer", "Practitioner/d1"), tok("code", "1234-5", LOINC))
    seed.add("Observation", "o5", ref("subject", "Patient/gone"), ref("patient", "Patient/gone"))
    seed.add("Patient", "gone", tok("identifier", "789", "urn:mrn"))
    seed.delete("Patient", "gone")


def test_chained_parameters(conn: sa.Connection, seed: Seeder) -> None:
    _chain_world(seed)

    def q(query: str) -> set[str]:
        return id_set(search(conn, "Observation", query))

    assert q("patient.identifier=urn:mrn|123") == {"o1"}
    assert q("patient.identifier=123,456") == {"o1", "o2", "o3"}
    assert q("subject:Patient.name=bo") == {"o2", "o3"}
    assert q("subject.name=bo&code=1234-5") == {"o2"}
    # performer targets several types; every one that defines ``name`` is tried.
    assert q("performer.name=anna") == {"o4"}
    # A deleted target matches nothing.
    assert q("patient.identifier=789") == set()
    assert q("patient._id=p1") == {"o1"}
    # A token criterion drives and the chain nests the same kind of driving subquery inside.
    assert q("identifier=urn:obs|obs-1&patient.identifier=urn:mrn|123") == {"o1"}
    assert q("identifier=urn:obs|obs-1&patient.identifier=urn:mrn|456") == set()
    with pytest.raises(BadRequest, match="no-such"):
        search(conn, "Observation", "patient.no-such=1")
    with pytest.raises(BadRequest, match="one level"):
        search(conn, "Observation", "patient.organization.name=x")


def test_negations_inside_chains_and_has(conn: sa.Connection, seed: Seeder) -> None:
    seed.add("Patient", "f", tok("gender", "female"), tok("identifier", "1", "urn:mrn"))
    seed.add("Patient", "m", tok("gender", "male"), tok("identifier", "2", "urn:mrn"))
    seed.add("Patient", "u", tok("identifier", "3", "urn:mrn"))
    for pid in ("f", "m", "u"):
        seed.add(
            "Observation",
            f"o-{pid}",
            ref("patient", f"Patient/{pid}"),
            tok("code", "a"),
            tok("status", "final"),
        )
    seed.add("Observation", "o-f2", ref("patient", "Patient/f"), tok("code", "b"))

    def obs(query: str) -> set[str]:
        return id_set(search(conn, "Observation", query))

    assert obs("patient.gender:not=male") == {"o-f", "o-u", "o-f2"}
    assert obs("patient.gender:missing=true") == {"o-u"}
    assert obs("patient.gender=female&patient.identifier=urn:mrn|1&code=a") == {"o-f"}
    assert obs("patient.gender:not=male&status:missing=true") == {"o-f2"}

    def pat(query: str) -> set[str]:
        return id_set(search(conn, "Patient", query))

    assert pat("_has:Observation:patient:code:not=a") == {"f"}
    assert pat("_has:Observation:patient:status:missing=true") == {"f"}
    assert pat("_has:Observation:patient:code=a&_has:Observation:patient:code=b") == {"f"}
    assert pat("_has:Observation:patient:code=a&gender:not=female") == {"m", "u"}


def test_reverse_chaining(conn: sa.Connection, seed: Seeder) -> None:
    _chain_world(seed)
    seed.add("Patient", "p3")

    def q(query: str) -> set[str]:
        return id_set(search(conn, "Patient", query))

    assert q("_has:Observation:patient:code=1234-5") == {"p1", "p2"}
    assert q("_has:Observation:patient:code=9999-9") == {"p2"}
    assert q("_has:Observation:patient:code=9999-9&identifier=123") == set()
    assert q("_has:Observation:subject:code:missing=true") == set()
    with pytest.raises(BadRequest, match="cannot refer"):
        search(conn, "Patient", "_has:Observation:specimen:code=1")


# --- sorting --------------------------------------------------------------------------------------


def _sort_world(seed: Seeder) -> None:
    seed.add(
        "Observation", "a", date("date", "2024-01-03"), tok("status", "final"), num("value-quantity", "5")
    )
    seed.add(
        "Observation", "b", date("date", "2024-01-01"), tok("status", "amended"), num("value-quantity", "7")
    )
    seed.add(
        "Observation",
        "c",
        date("date", "2024-01-02"),
        date("date", "2024-01-05"),
        tok("status", "final"),
        num("value-quantity", "1"),
    )
    seed.add("Observation", "d", tok("status", "amended"))
    seed.add("Observation", "e", date("date", "2024-01-01"), tok("status", "final"))


def test_sort_single_key_both_directions_missing_last(conn: sa.Connection, seed: Seeder) -> None:
    _sort_world(seed)
    # Ascending by the lowest value (c: 01-02), descending by the highest (c: 01-05); b and e tie
    # and fall back to pk; d has no date and comes last either way.
    assert ids(search(conn, "Observation", "_sort=date")) == ["b", "e", "c", "a", "d"]
    assert ids(search(conn, "Observation", "_sort=-date")) == ["c", "a", "e", "b", "d"]
    assert ids(search(conn, "Observation", "_sort=value-quantity")) == ["c", "a", "b", "d", "e"]
    assert ids(search(conn, "Observation", "_sort=-value-quantity")) == ["b", "a", "c", "e", "d"]


def test_sort_several_keys(conn: sa.Connection, seed: Seeder) -> None:
    _sort_world(seed)
    # amended (b, d) before final (c, a, e); within a status, latest date first, no date last.
    assert ids(search(conn, "Observation", "_sort=status,-date")) == ["b", "d", "c", "a", "e"]
    assert ids(search(conn, "Observation", "_sort=-status,date")) == ["e", "c", "a", "b", "d"]


def test_sort_by_string_token_and_reference(conn: sa.Connection, seed: Seeder) -> None:
    seed.add(
        "Patient", "1", string("family", "Örn"), tok("gender", "male"), ref("organization", "Organization/b")
    )
    seed.add(
        "Patient",
        "2",
        string("family", "Berg"),
        tok("gender", "female"),
        ref("organization", "Organization/a"),
    )
    seed.add("Patient", "3", string("family", "berg"), string("family", "Zed"))
    seed.add("Patient", "4", tok("gender", "other"), ref("organization", "Organization/c"))
    # Folded values: "berg" ties "Berg" (pk breaks it), "orn" sorts among the o's.
    assert ids(search(conn, "Patient", "_sort=family")) == ["2", "3", "1", "4"]
    assert ids(search(conn, "Patient", "_sort=-family")) == ["3", "1", "2", "4"]
    assert ids(search(conn, "Patient", "_sort=gender")) == ["2", "1", "4", "3"]
    assert ids(search(conn, "Patient", "_sort=-organization")) == ["4", "1", "2", "3"]


def test_sort_on_resource_columns_and_default(conn: sa.Connection, seed: Seeder) -> None:
    seed.add("Patient", "m", last_updated=datetime(2024, 1, 2))
    seed.add("Patient", "z", last_updated=datetime(2024, 1, 1))
    seed.add("Patient", "a", last_updated=datetime(2024, 1, 3))
    assert ids(search(conn, "Patient")) == ["m", "z", "a"]  # insertion (pk) order
    assert ids(search(conn, "Patient", "_sort=_id")) == ["a", "m", "z"]
    assert ids(search(conn, "Patient", "_sort=-_id")) == ["z", "m", "a"]
    assert ids(search(conn, "Patient", "_sort=_lastUpdated")) == ["z", "m", "a"]
    assert ids(search(conn, "Patient", "_sort=-_lastUpdated")) == ["a", "m", "z"]


# --- keyset paging --------------------------------------------------------------------------------


def _walk(conn: sa.Connection, res_type: str, query: str, *, limit: int = 50) -> list[list[str]]:
    """All pages, following next cursors from the first page."""
    pages: list[list[str]] = []
    page = search(conn, res_type, query)
    pages.append(ids(page))
    while page.next_cursor is not None and len(pages) < limit:
        page = search(conn, res_type, page_query(page.request, page.next_cursor))
        pages.append(ids(page))
    return pages


@pytest.mark.parametrize(
    "sort", ["", "_sort=-_lastUpdated", "_sort=date", "_sort=-date,_id", "_sort=status,-date"]
)
def test_paging_forward_and_back_visits_every_row_once(conn: sa.Connection, seed: Seeder, sort: str) -> None:
    for i in range(23):
        rows: list[IndexRow] = [tok("status", "final" if i % 3 else "amended")]
        if i % 4:  # some without a date: they sort last
            rows.append(date("date", f"2024-02-{1 + i % 5:02d}"))
        seed.add("Observation", f"o{i:02d}", *rows)
    everything = ids(search(conn, "Observation", f"{sort}&_count=100"))
    assert len(everything) == 23

    pages = _walk(conn, "Observation", f"{sort}&_count=5")
    assert [len(p) for p in pages] == [5, 5, 5, 5, 3]
    assert [i for p in pages for i in p] == everything

    # Walk back from the last page with prev cursors.
    page = search(conn, "Observation", f"{sort}&_count=5")
    while page.next_cursor is not None:
        page = search(conn, "Observation", page_query(page.request, page.next_cursor))
    assert ids(page) == everything[20:]
    back: list[list[str]] = [ids(page)]
    while page.prev_cursor is not None:
        page = search(conn, "Observation", page_query(page.request, page.prev_cursor))
        back.append(ids(page))
    assert [i for p in reversed(back) for i in p] == everything
    assert back[-1] == everything[:5]


def test_paging_is_stable_under_concurrent_inserts_and_deletes(conn: sa.Connection, seed: Seeder) -> None:
    for i in range(20):
        seed.add("Observation", f"o{i:02d}", date("date", f"2024-03-{1 + i:02d}"))
    first = search(conn, "Observation", "_sort=-date&_count=6")
    assert ids(first) == [f"o{i:02d}" for i in range(19, 13, -1)]
    # Between page fetches: a newer row (would sort first), an older one (sorts into a later
    # page), and deletions both on the page just served and further on.
    seed.add("Observation", "new-first", date("date", "2024-04-01"))
    seed.add("Observation", "new-later", date("date", "2024-03-05T12:00:00"))
    seed.delete("Observation", "o14")
    seed.delete("Observation", "o10")
    seen = ids(first)
    page = first
    while page.next_cursor is not None:
        page = search(conn, "Observation", page_query(page.request, page.next_cursor))
        seen.extend(ids(page))
        if len(seen) > 60:
            break
    survivors = [f"o{i:02d}" for i in range(20) if i not in (10,)]
    for row_id in survivors:
        assert seen.count(row_id) == 1, row_id
    assert "new-later" in seen
    assert "new-first" not in seen  # it sorts before the position already passed
    assert "o10" not in seen

    # Going back from the second page while rows are inserted in front still serves a full page.
    second = search(conn, "Observation", page_query(first.request, first.next_cursor or ""))
    seed.add("Observation", "newest", date("date", "2024-05-01"))
    assert second.prev_cursor is not None
    back = search(conn, "Observation", page_query(second.request, second.prev_cursor))
    assert len(ids(back)) == 6
    assert ids(back)[-1] == "o15"


def test_first_page_has_no_prev_and_last_has_no_next(conn: sa.Connection, seed: Seeder) -> None:
    for i in range(4):
        seed.add("Patient", f"p{i}")
    page = search(conn, "Patient", "_count=2")
    assert page.prev_cursor is None and page.next_cursor is not None
    last = search(conn, "Patient", page_query(page.request, page.next_cursor))
    assert ids(last) == ["p2", "p3"]
    assert last.next_cursor is None and last.prev_cursor is not None
    everything = search(conn, "Patient", "_count=10")
    assert everything.next_cursor is None and everything.prev_cursor is None


def test_bad_cursors_are_rejected(conn: sa.Connection, seed: Seeder) -> None:
    for i in range(3):
        seed.add("Observation", f"o{i}", date("date", f"2024-01-0{i + 1}"))
    page = search(conn, "Observation", "_sort=date&_count=1")
    assert page.next_cursor is not None
    with pytest.raises(BadRequest, match="cursor"):
        search(conn, "Observation", "_sort=date&_cursor=garbage")
    with pytest.raises(BadRequest, match="cursor"):
        search(conn, "Observation", "_sort=date&_cursor=" + page.next_cursor[:-3] + "AAA")
    tampered = "x" + page.next_cursor[1:]
    with pytest.raises(BadRequest, match="cursor"):
        search(conn, "Observation", "_sort=date&_cursor=" + tampered)
    with pytest.raises(BadRequest, match="another sort"):
        search(conn, "Observation", "_sort=-date&_cursor=" + page.next_cursor)
    with pytest.raises(BadRequest, match="another sort"):
        search(conn, "Patient", "_sort=birthdate&_cursor=" + page.next_cursor)


# --- totals, summary -----------------------------------------------------------------------------


def test_totals(conn: sa.Connection, seed: Seeder) -> None:
    for i in range(7):
        seed.add("Observation", f"o{i}", tok("status", "final" if i < 5 else "amended"))
    seed.add("Observation", "gone", tok("status", "final"))
    seed.delete("Observation", "gone")
    page = search(conn, "Observation", "status=final&_count=2")
    assert page.total is None
    page = search(conn, "Observation", "status=final&_count=2&_total=accurate")
    assert page.total == 5 and len(page.matches) == 2
    page = search(conn, "Observation", "status=final&_summary=count")
    assert page.total == 5 and page.matches == []
    page = search(conn, "Observation", "_count=0")
    assert page.total == 7 and page.matches == []
    assert search(conn, "Observation", "_total=estimate").total is None


def test_deleted_resources_and_other_types_are_never_matched(conn: sa.Connection, seed: Seeder) -> None:
    seed.add("Patient", "p1")
    seed.add("Patient", "p2")
    seed.add("Practitioner", "p3")
    seed.delete("Patient", "p2")
    assert ids(search(conn, "Patient")) == ["p1"]
    assert ids(search(conn, "Patient", "_id=p2")) == []


def test_matches_carry_the_stored_json(conn: sa.Connection, seed: Seeder) -> None:
    document = {"resourceType": "Patient", "id": "p1", "name": [{"family": "Ødegård"}], "active": True}
    seed.add("Patient", "p1", body=document)
    (row,) = search(conn, "Patient").matches
    assert body(row) == document
    assert (row.res_type, row.res_id, row.version) == ("Patient", "p1", 1)
    assert isinstance(row.last_updated, datetime)


# --- _include / _revinclude -----------------------------------------------------------------------


def _include_world(seed: Seeder) -> None:
    seed.add("Organization", "org")
    seed.add("Patient", "p1", ref("organization", "Organization/org"))
    seed.add("Patient", "p2")
    seed.add("Practitioner", "dr")
    seed.add("Encounter", "e1", ref("subject", "Patient/p1"), ref("patient", "Patient/p1"))
    seed.add(
        "Observation",
        "o1",
        ref("subject", "Patient/p1"),
        ref("patient", "Patient/p1"),
        ref("performer", "Practitioner/dr"),
        ref("encounter", "Encounter/e1"),
        tok("code", "x"),
    )
    seed.add(
        "Observation", "o2", ref("subject", "Patient/p1"), ref("patient", "Patient/p1"), tok("code", "x")
    )
    seed.add(
        "Observation", "o3", ref("subject", "Patient/p2"), ref("patient", "Patient/p2"), tok("code", "y")
    )
    seed.add(
        "Observation",
        "o4",
        ref("subject", "Patient/missing"),
        ref("patient", "Patient/missing"),
        tok("code", "x"),
    )
    seed.add(
        "Observation", "o5", ref("subject", "Patient/p1"), ref("patient", "Patient/p1"), tok("code", "z")
    )
    seed.delete("Observation", "o5")


def _included(page: object) -> set[str]:
    assert hasattr(page, "includes")
    return {f"{r.res_type}/{r.res_id}" for r in page.includes}


def test_include(conn: sa.Connection, seed: Seeder) -> None:
    _include_world(seed)
    page = search(conn, "Observation", "code=x&_include=Observation:patient")
    assert ids(page) == ["o1", "o2", "o4"]
    assert _included(page) == {"Patient/p1"}  # deduplicated; the missing target is skipped
    page = search(conn, "Observation", "code=x&_include=Observation:*")
    assert _included(page) == {"Patient/p1", "Practitioner/dr", "Encounter/e1"}
    page = search(conn, "Observation", "code=x&_include=Observation:performer:Patient")
    assert _included(page) == set()
    page = search(
        conn, "Observation", "code=x&_include=Observation:patient&_include:iterate=Patient:organization"
    )
    assert _included(page) == {"Patient/p1", "Organization/org"}
    # Without :iterate the second hop is not taken.
    page = search(conn, "Observation", "code=x&_include=Observation:patient&_include=Patient:organization")
    assert _included(page) == {"Patient/p1"}


def test_revinclude(conn: sa.Connection, seed: Seeder) -> None:
    _include_world(seed)
    page = search(conn, "Patient", "_id=p1&_revinclude=Observation:patient")
    assert ids(page) == ["p1"]
    assert _included(page) == {"Observation/o1", "Observation/o2"}  # not the deleted o5
    page = search(conn, "Patient", "_revinclude=Observation:subject&_revinclude=Encounter:subject")
    assert _included(page) == {"Observation/o1", "Observation/o2", "Observation/o3", "Encounter/e1"}
    page = search(
        conn, "Patient", "_id=p2&_revinclude=Observation:patient&_include:iterate=Observation:performer"
    )
    assert _included(page) == {"Observation/o3"}
    page = search(
        conn, "Patient", "_id=p1&_revinclude=Observation:patient&_include:iterate=Observation:performer"
    )
    assert _included(page) == {"Observation/o1", "Observation/o2", "Practitioner/dr"}
    # Matches are not repeated among the includes.
    page = search(conn, "Patient", "_revinclude=Patient:organization&_include=Patient:organization")
    assert _included(page) == {"Organization/org"}


def test_include_canonical(conn: sa.Connection, seed: Seeder) -> None:
    url = "http://x.org/Questionnaire/phq9"
    seed.add("Questionnaire", "q1", UriRow("url", url), tok("version", "1.0"))
    seed.add("Questionnaire", "q2", UriRow("url", url), tok("version", "2.0"))
    seed.add(
        "QuestionnaireResponse",
        "r1",
        ReferenceRow("questionnaire", None, None, url=url, canonical_version="2.0"),
    )
    page = search(conn, "QuestionnaireResponse", "_include=QuestionnaireResponse:questionnaire")
    assert _included(page) == {"Questionnaire/q2"}
    page = search(conn, "Questionnaire", "_id=q1&_revinclude=QuestionnaireResponse:questionnaire")
    assert _included(page) == {"QuestionnaireResponse/r1"}


def test_include_limit_is_reported(
    conn: sa.Connection, seed: Seeder, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed.add("Patient", "p")
    for i in range(5):
        seed.add("Observation", f"o{i}", ref("patient", "Patient/p"))
    monkeypatch.setattr(search_engine, "INCLUDE_LIMIT", 3)
    page = search(conn, "Patient", "_revinclude=Observation:patient")
    assert len(page.includes) == 3 and page.includes_truncated


# --- conditional interactions, errors --------------------------------------------------------------


def _matching(conn: sa.Connection, res_type: str, params: list[tuple[str, str]], limit: int) -> list[Any]:
    return find_matching(conn, parse_search(res_type, params, strict=True), limit)


def test_find_matching(conn: sa.Connection, seed: Seeder) -> None:
    seed.add("Patient", "p1", tok("identifier", "1", "urn:mrn"))
    seed.add("Patient", "p2", tok("identifier", "1", "urn:mrn"))
    seed.add("Patient", "p3", tok("identifier", "3", "urn:mrn"))
    assert ids(_matching(conn, "Patient", [("identifier", "urn:mrn|3")], 2)) == ["p3"]
    assert ids(_matching(conn, "Patient", [("identifier", "urn:mrn|1")], 2)) == ["p1", "p2"]
    assert ids(_matching(conn, "Patient", [("identifier", "urn:mrn|1")], 1)) == ["p1"]
    assert _matching(conn, "Patient", [("identifier", "urn:mrn|9")], 2) == []
    with pytest.raises(BadRequest, match="bogus"):
        _matching(conn, "Patient", [("bogus", "1")], 2)


def test_unknown_parameters_strict_and_lenient(conn: sa.Connection, seed: Seeder) -> None:
    seed.add("Patient", "p1", tok("gender", "female"))
    seed.add("Patient", "p2", tok("gender", "male"))
    with pytest.raises(BadRequest, match="bogus"):
        search(conn, "Patient", "gender=female&bogus=1", strict=True)
    page = search(conn, "Patient", "gender=female&bogus=1", strict=False)
    assert ids(page) == ["p1"]
    assert page.request.ignored == (("bogus", "1"),)


def test_bad_values_are_bad_requests(conn: sa.Connection) -> None:
    for query in ("date=2024-13-01", "date=xx2024", "value-quantity=abc", "code:bogus=1", "_count=-1"):
        with pytest.raises(BadRequest):
            search(conn, "Observation", query, strict=False)


def test_plain_request_runs_on_its_own(conn: sa.Connection, seed: Seeder) -> None:
    seed.add("Patient", "p1")
    page = execute_search(conn, request("Patient", "_count=1"))
    assert ids(page) == ["p1"]
