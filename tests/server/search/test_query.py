"""Parsing search parameters into a SearchRequest (https://hl7.org/fhir/R4/search.html).

No database here: these pin down names, modifiers, prefixes, escaping, result parameters,
errors, cursors and the links rendered back from a request.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from urllib.parse import parse_qsl

import pytest

from fhir_norse.outcomes import BadRequest
from fhir_norse.server.search.links import page_query, self_query
from fhir_norse.server.search.parse import MAX_COUNT, parse_search, split_escaped, unescape
from fhir_norse.store.search.cursor import Cursor, ValueKind, decode_cursor, encode_cursor
from fhir_norse.store.search.request import (
    ChainCriterion,
    CompositeValue,
    Criterion,
    DateValue,
    HasCriterion,
    MissingValue,
    NumberValue,
    QuantityValue,
    ReferenceValue,
    SearchRequest,
    StringValue,
    TokenValue,
    UriValue,
)


def parse(res_type: str, query: str, *, strict: bool = True) -> SearchRequest:
    return parse_search(res_type, parse_qsl(query, keep_blank_values=True), strict=strict)


def only(req: SearchRequest) -> Criterion:
    (criterion,) = req.criteria
    assert isinstance(criterion, Criterion)
    return criterion


# --- escaping -------------------------------------------------------------------------------------


def test_split_and_unescape() -> None:
    assert split_escaped(r"a,b\,c,d", ",") == ["a", r"b\,c", "d"]
    assert split_escaped(r"s|c\|d", "|") == ["s", r"c\|d"]
    assert split_escaped("", ",") == [""]
    assert unescape(r"b\,c\|d\$e\\f\x") == "b,c|d$e\\f\\x"


def test_or_values_with_escapes() -> None:
    crit = only(parse("Patient", r"identifier=urn:a|x\,y,urn:b|z"))
    assert crit.values == (TokenValue("urn:a", "x,y"), TokenValue("urn:b", "z"))


# --- token ----------------------------------------------------------------------------------------


def test_token_forms() -> None:
    assert only(parse("Observation", "code=1234-5")).values == (TokenValue(None, "1234-5"),)
    assert only(parse("Observation", "code=http://loinc.org|1234-5")).values == (
        TokenValue("http://loinc.org", "1234-5"),
    )
    assert only(parse("Observation", "code=|1234-5")).values == (TokenValue(None, "1234-5", no_system=True),)
    assert only(parse("Observation", "code=http://loinc.org|")).values == (
        TokenValue("http://loinc.org", None),
    )
    with pytest.raises(BadRequest, match="more than one"):
        parse("Observation", "code=a|b|c")
    with pytest.raises(BadRequest, match="empty"):
        parse("Observation", "code=|")


def test_token_modifiers() -> None:
    crit = only(parse("Observation", "code:not=1"))
    assert crit.modifier == "not"
    crit = only(parse("Observation", "code:text=Héart%20Rate"))
    assert crit.modifier == "text"
    assert crit.values == (StringValue("Héart Rate", "heart rate"),)
    crit = only(parse("Observation", "code:missing=true"))
    assert crit.values == (MissingValue(True),)
    with pytest.raises(BadRequest, match="true or false"):
        parse("Observation", "code:missing=yes")
    with pytest.raises(BadRequest, match="Unknown modifier ':exact'"):
        parse("Observation", "code:exact=1")
    with pytest.raises(BadRequest, match="not supported") as info:
        parse("Observation", "code:in=http://vs")
    assert info.value.issues[0].code == "not-supported"


# --- string, uri ----------------------------------------------------------------------------------


def test_string_and_uri() -> None:
    crit = only(parse("Patient", "family:exact=Müller"))
    assert crit.modifier == "exact" and crit.values == (StringValue("Müller", "muller"),)
    assert only(parse("Patient", "name:contains=ann")).modifier == "contains"
    crit = only(parse("Questionnaire", "url:below=http://x.org/fhir"))
    assert crit.modifier == "below" and crit.values == (UriValue("http://x.org/fhir"),)
    with pytest.raises(BadRequest, match="Unknown modifier"):
        parse("Patient", "family:below=x")


# --- date, number, quantity -----------------------------------------------------------------------


def test_date_prefixes_and_ranges() -> None:
    crit = only(parse("Observation", "date=ge2024-03"))
    (value,) = crit.values
    assert isinstance(value, DateValue)
    assert value.prefix == "ge"
    assert value.low == datetime(2024, 3, 1)
    assert value.high == datetime(2024, 3, 31, 23, 59, 59, 999999)
    for prefix in ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"):
        (v,) = only(parse("Observation", f"date={prefix}2024")).values
        assert isinstance(v, DateValue) and v.prefix == prefix
    (v,) = only(parse("Observation", "date=2024-03-10T10:00:00%2B02:00")).values
    assert isinstance(v, DateValue) and v.low == datetime(2024, 3, 10, 8)


@pytest.mark.parametrize("value", ["2024-13", "xx2024", "2024-02-30", "24", "2024-03-10T25:00"])
def test_bad_dates(value: str) -> None:
    with pytest.raises(BadRequest, match="date"):
        parse("Observation", f"date={value}")


def test_unknown_prefix_is_named() -> None:
    with pytest.raises(BadRequest, match="Unknown prefix 'xx'"):
        parse("Observation", "date=xx2024")
    with pytest.raises(BadRequest, match="Unknown prefix 'zz'"):
        parse("Observation", "value-quantity=zz5")


def test_number_and_quantity_values() -> None:
    (v,) = only(parse("Observation", "value-quantity=gt5.40")).values
    assert isinstance(v, QuantityValue)
    assert v.number == NumberValue("gt", "gt5.40", Decimal("5.40"), Decimal("5.395"), Decimal("5.405"))
    assert v.system is None and v.code is None
    (v,) = only(parse("Observation", "value-quantity=5|http://unitsofmeasure.org|mg")).values
    assert isinstance(v, QuantityValue) and (v.system, v.code) == ("http://unitsofmeasure.org", "mg")
    (v,) = only(parse("Observation", "value-quantity=5||mg")).values
    assert isinstance(v, QuantityValue) and (v.system, v.code) == (None, "mg")
    with pytest.raises(BadRequest, match="not a number"):
        parse("Observation", "value-quantity=gt5x")
    with pytest.raises(BadRequest, match=r"number\|system\|code"):
        parse("Observation", "value-quantity=5|mg")
    with pytest.raises(BadRequest, match="not a finite"):
        parse("Observation", "value-quantity=eqInfinity")


# --- reference ------------------------------------------------------------------------------------


def test_reference_values() -> None:
    def value(query: str, res_type: str = "Observation") -> object:
        (v,) = only(parse(res_type, query)).values
        return v

    assert value("subject=123") == ReferenceValue(target_id="123")
    assert value("subject=Patient/123") == ReferenceValue("Patient", "123")
    assert value("subject=Patient/123/_history/2") == ReferenceValue("Patient", "123")
    assert value("subject=http://h/fhir/Patient/123") == ReferenceValue(
        "Patient", "123", url="http://h/fhir/Patient/123"
    )
    assert value("questionnaire=http://x/Questionnaire/q|1.0", "QuestionnaireResponse") == ReferenceValue(
        url="http://x/Questionnaire/q", version="1.0"
    )
    assert value("subject=urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0") == ReferenceValue(
        url="urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0"
    )
    crit = only(parse("Observation", "subject:Patient=123"))
    assert crit.target_type == "Patient" and crit.modifier is None
    assert crit.values == (ReferenceValue("Patient", "123"),)
    with pytest.raises(BadRequest, match="cannot refer to a Practitioner"):
        parse("Observation", "subject:Practitioner=1")
    with pytest.raises(BadRequest, match="cannot refer to a Practitioner"):
        parse("Observation", "patient=Practitioner/1")
    with pytest.raises(BadRequest, match="not a valid"):
        parse("Observation", "subject=a/b/c")
    by_identifier = parse("Observation", "subject:identifier=urn:mrn|1").criteria[0]
    assert isinstance(by_identifier, Criterion) and by_identifier.modifier == "identifier"
    assert by_identifier.values == (TokenValue(system="urn:mrn", code="1"),)


# --- composite, chains, _has ----------------------------------------------------------------------


def test_composite() -> None:
    (v,) = only(
        parse("Observation", "code-value-quantity=http://loinc.org|1234-5$gt5.4|http://unitsofmeasure.org|mg")
    ).values
    assert isinstance(v, CompositeValue)
    assert v.first == TokenValue("http://loinc.org", "1234-5")
    assert v.second_type == "quantity"
    assert isinstance(v.second, QuantityValue) and v.second.number.prefix == "gt"
    (v,) = only(parse("Observation", "code-value-date=1234-5$ge2024")).values
    assert isinstance(v, CompositeValue) and isinstance(v.second, DateValue)
    (v,) = only(parse("Observation", r"code-value-string=1234-5$a\$b")).values
    assert isinstance(v, CompositeValue) and v.second == StringValue("a$b", "a$b")
    with pytest.raises(BadRequest, match=r"two components"):
        parse("Observation", "code-value-quantity=1234-5")


def test_chains() -> None:
    (crit,) = parse("Observation", "patient.identifier=urn:mrn|1").criteria
    assert isinstance(crit, ChainCriterion)
    assert crit.reference.code == "patient"
    # Every supported target of Observation.patient that defines ``identifier``.
    assert [h.resource_type for h in crit.hops] == ["Patient", "Group"]
    (crit,) = parse("Observation", "performer.name=anna").criteria
    assert isinstance(crit, ChainCriterion)
    # Every supported target that defines ``name`` (CareTeam and PractitionerRole do not).
    assert [h.resource_type for h in crit.hops] == ["Practitioner", "Organization", "Patient"]
    (crit,) = parse("Observation", "subject:Patient.name:exact=Anna").criteria
    assert isinstance(crit, ChainCriterion)
    assert [h.resource_type for h in crit.hops] == ["Patient"]
    assert crit.hops[0].modifier == "exact"
    with pytest.raises(BadRequest, match="one level"):
        parse("Observation", "patient.organization.name=x")
    with pytest.raises(BadRequest, match="only reference"):
        parse("Observation", "code.name=x")
    with pytest.raises(BadRequest, match="no target"):
        parse("Observation", "patient.bogus=x")
    req = parse("Observation", "patient.bogus=x", strict=False)
    assert req.criteria == () and req.ignored == (("patient.bogus", "x"),)


def test_has() -> None:
    (crit,) = parse("Patient", "_has:Observation:patient:code=1234-5").criteria
    assert isinstance(crit, HasCriterion)
    assert crit.source_type == "Observation" and crit.reference.code == "patient"
    assert crit.inner.param.code == "code" and crit.inner.values == (TokenValue(None, "1234-5"),)
    (crit,) = parse("Patient", "_has:Observation:patient:code:not=1").criteria
    assert isinstance(crit, HasCriterion) and crit.inner.modifier == "not"
    with pytest.raises(BadRequest, match="form"):
        parse("Patient", "_has:Observation:patient=1")
    with pytest.raises(BadRequest, match="one level"):
        parse("Patient", "_has:Observation:patient:_has:Encounter:x:y=1")
    with pytest.raises(BadRequest, match="cannot refer"):
        parse("Patient", "_has:Observation:specimen:code=1")
    with pytest.raises(BadRequest, match="Unknown resource type"):
        parse("Patient", "_has:Nope:patient:code=1")


# --- common and unknown parameters ----------------------------------------------------------------


def test_common_parameters() -> None:
    crit = only(parse("Patient", "_id=a,b"))
    assert crit.param.code == "_id" and crit.values == (TokenValue(None, "a"), TokenValue(None, "b"))
    (v,) = only(parse("Patient", "_lastUpdated=gt2024-01-01")).values
    assert isinstance(v, DateValue) and v.prefix == "gt"
    assert only(parse("Patient", "_tag=http://t|x")).param.type == "token"
    assert only(parse("Patient", "_profile=http://p")).param.type == "uri"
    with pytest.raises(BadRequest, match="not a valid resource id"):
        parse("Patient", "_id=a%20b")
    with pytest.raises(BadRequest, match="Unknown modifier"):
        parse("Patient", "_id:exact=a")


def test_unknown_parameters_strict_and_lenient() -> None:
    with pytest.raises(BadRequest, match="'bogus'") as info:
        parse("Patient", "bogus=1&gender=male")
    assert info.value.issues[0].expression == ("bogus",)
    req = parse("Patient", "bogus=1&gender=male&_content=x&_text=y", strict=False)
    assert [c.name for c in req.criteria if isinstance(c, Criterion)] == ["gender"]
    assert req.ignored == (("bogus", "1"), ("_content", "x"), ("_text", "y"))
    assert req.params == (("gender", "male"),)
    # Unknown modifiers and malformed values are errors even when lenient.
    with pytest.raises(BadRequest):
        parse("Patient", "gender:bogus=male", strict=False)
    with pytest.raises(BadRequest, match="Unknown resource type"):
        parse("Nope", "x=1")


def test_empty_values_are_skipped_but_empty_or_items_are_not() -> None:
    assert parse("Patient", "gender=&family=").criteria == ()
    with pytest.raises(BadRequest, match="empty value"):
        parse("Patient", "gender=male,,female")


def test_repeated_names_are_and() -> None:
    req = parse("Observation", "date=ge2024&date=lt2025")
    assert len(req.criteria) == 2


# --- result parameters ----------------------------------------------------------------------------


def test_result_parameters() -> None:
    req = parse(
        "Observation", "_sort=-date,status,_id&_count=10&_summary=data&_elements=code,subject&_total=accurate"
    )
    assert [(k.param.code, k.descending) for k in req.sort] == [
        ("date", True),
        ("status", False),
        ("_id", False),
    ]
    assert req.count == 10 and req.summary == "data" and req.elements == ("code", "subject")
    assert req.total == "accurate" and req.wants_total
    req = parse("Observation", "_format=json&_pretty=true")
    assert req.criteria == () and req.count == 50 and req.total == "none" and not req.wants_total
    assert parse("Observation", f"_count={MAX_COUNT + 5}").count == MAX_COUNT
    req = parse("Observation", "_count=0")
    assert req.wants_total and not req.wants_matches
    req = parse("Observation", "_summary=count")
    assert req.wants_total and not req.wants_matches


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("_count=x", "whole number"),
        ("_count=-1", "negative"),
        ("_count=1&_count=2", "only once"),
        ("_summary=maybe", "_summary"),
        ("_total=all", "_total"),
        ("_sort=bogus", "Cannot sort"),
        ("_sort=code-value-quantity", "composite"),
        ("_sort=date,-date", "twice"),
        ("_sort=", ""),
        ("_sort:desc=date", "modifier"),
    ],
)
def test_bad_result_parameters(query: str, message: str) -> None:
    if query == "_sort=":
        assert parse("Observation", query).sort == ()
        return
    with pytest.raises(BadRequest, match=message):
        parse("Observation", query, strict=False)


def test_includes() -> None:
    req = parse(
        "Observation",
        "_include=Observation:patient&_include=Observation:subject:Patient&_include:iterate=Patient:organization"
        "&_revinclude=Provenance:target&_include=*",
    )
    inc = req.includes
    assert [(i.source_type, [p.code for p in i.params], i.target_type, i.iterate) for i in inc[:3]] == [
        ("Observation", ["patient"], None, False),
        ("Observation", ["subject"], "Patient", False),
        ("Patient", ["organization"], None, True),
    ]
    star = inc[3]
    assert star.source_type == "Observation" and "performer" in {p.code for p in star.params}
    assert all(p.type == "reference" for p in star.params)
    (rev,) = req.revincludes
    assert rev.reverse and rev.source_type == "Provenance" and rev.params[0].code == "target"
    assert parse("Observation", "_include:recurse=Observation:patient").includes[0].iterate
    for bad in (
        "_include=Observation",
        "_include=Observation:code",
        "_include=Nope:x",
        "_include:deep=Observation:patient",
        "_include=Observation:subject:Practitioner",
    ):
        with pytest.raises(BadRequest):
            parse("Observation", bad, strict=False)


# --- cursors and links ----------------------------------------------------------------------------


def test_cursor_round_trip_and_rejections() -> None:
    cursor = Cursor("next", (datetime(2024, 1, 2, 3, 4, 5, 6), 1.5, "abc", None), 42)
    kinds: tuple[ValueKind, ...] = ("datetime", "float", "str", "str")
    token = encode_cursor(cursor, "Observation?-date")
    assert decode_cursor(token, "Observation?-date", kinds) == cursor
    assert all(ch.isalnum() or ch in "-_." for ch in token)
    with pytest.raises(BadRequest, match="another sort"):
        decode_cursor(token, "Observation?date", kinds)
    with pytest.raises(BadRequest, match="sort values"):
        decode_cursor(token, "Observation?-date", ("datetime",))
    with pytest.raises(BadRequest, match="bad date"):
        decode_cursor(token, "Observation?-date", ("datetime", "datetime", "datetime", "str"))
    with pytest.raises(BadRequest, match="bad text"):
        decode_cursor(token, "Observation?-date", ("str", "float", "str", "str"))
    for garbage in ("", "abc", "a.b", "!!!.???", token + "x", "x" + token, token.replace(".", "")):
        with pytest.raises(BadRequest, match="cursor"):
            decode_cursor(garbage, "Observation?-date", kinds)


def test_cursor_in_request_is_checked_against_the_sort() -> None:
    token = encode_cursor(Cursor("prev", (datetime(2024, 1, 1),), 7), "Observation?-date")
    req = parse("Observation", f"_sort=-date&_cursor={token}")
    assert req.cursor == Cursor("prev", (datetime(2024, 1, 1),), 7)
    assert req.cursor_token == token
    with pytest.raises(BadRequest, match="cursor"):
        parse("Observation", f"_sort=date&_cursor={token}")


def test_links_keep_used_parameters_only() -> None:
    token = encode_cursor(Cursor("next", (), 3), "Patient?")
    req = parse(
        "Patient",
        f"family=M%C3%BCller&bogus=1&birthdate=ge2000-01-01T00:00:00%2B01:00&_count=5000&_cursor={token}",
        strict=False,
    )
    assert self_query(req) == (
        "family=M%C3%BCller&birthdate=ge2000-01-01T00:00:00%2B01:00&_count=1000&_cursor=" + token
    )
    assert (
        page_query(req, "NEXT")
        == "family=M%C3%BCller&birthdate=ge2000-01-01T00:00:00%2B01:00&_count=1000&_cursor=NEXT"
    )
    # Links parse back to the same request.
    again = parse("Patient", page_query(req, token))
    assert again.criteria == req.criteria and again.cursor == req.cursor
    assert self_query(parse("Observation", "code=a|b,c&_include=Observation:patient")) == (
        "code=a|b,c&_include=Observation:patient"
    )
