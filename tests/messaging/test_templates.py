"""Message templates: every built-in text, the SMS length budget, site overrides and the sandbox."""

from __future__ import annotations

import itertools
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from jinja2.exceptions import SecurityError, UndefinedError

from fhir_norse.messaging.base import Channel
from fhir_norse.messaging.templates import (
    BUILTIN_DIR,
    CHANNELS,
    KINDS,
    LANGUAGES,
    Kind,
    MessageTemplates,
    RenderedMessage,
    gsm7_length,
)

CLINIC = "Poliklinikk Sørbyen"
# A 60-character link: a site's origin, "/p/" and a token.
LINK = "https://skjema.klinikk.no/p/" + "Xy3_-AbcDefGhiJkLmNoPqRsTuVwXyZ0"
WINTER = datetime(2025, 3, 14, 7, 0, tzinfo=UTC)  # 08.00 in Oslo (CET)
SUMMER = datetime(2025, 6, 14, 7, 0, tzinfo=UTC)  # 09.00 in Oslo (CEST)
CODE = "493817"

# Words that would say something clinical about the patient or the questionnaire.
CLINICAL = re.compile(
    r"phq|gad|nf21|norse|depresj|depress|angst|anxiety|diagnos|symptom|psykisk|mental|suicid|selvmord|"
    r"behandling|treatment|terapi|therapy",
    re.IGNORECASE,
)

ALL = list(itertools.product(KINDS, CHANNELS, LANGUAGES))


@pytest.fixture(scope="module")
def templates() -> MessageTemplates:
    return MessageTemplates()


def _render(
    templates: MessageTemplates, kind: Kind, channel: Channel, language: str, **changes: object
) -> RenderedMessage:
    options: dict[str, object] = {"clinic_name": CLINIC, "link": LINK, "expires_at": WINTER, "code": CODE}
    options.update(changes)
    return templates.render(kind, channel, language, **options)  # type: ignore[arg-type]


def test_every_built_in_template_exists() -> None:
    names = {path.name for path in BUILTIN_DIR.glob("*.j2")}
    assert names == {f"{k}.{c}.{lang}.j2" for k, c, lang in ALL}


@pytest.mark.parametrize(("kind", "channel", "language"), ALL)
def test_every_message_renders_with_the_clinic_and_nothing_clinical(
    templates: MessageTemplates, kind: Kind, channel: Channel, language: str
) -> None:
    message = _render(templates, kind, channel, language)

    text = f"{message.subject or ''}\n{message.body}"
    assert CLINIC in text
    if kind == "code":
        assert CODE in message.body
        assert LINK not in text
    else:
        assert LINK in message.body
        day, clock = ("14. mars", "kl. 08.00") if language == "nb" else ("14 March", "at 08:00")
        assert day in message.body and clock in message.body
    assert not CLINICAL.search(text.replace(CLINIC, ""))
    if channel == "email":
        assert message.subject and "\n" not in message.subject
        assert not message.body.lower().startswith("subject")
    else:
        assert message.subject is None
        assert gsm7_length(message.body) is not None, "bokmål letters are in the GSM-7 alphabet"


@pytest.mark.parametrize(("kind", "language"), list(itertools.product(KINDS, LANGUAGES)))
def test_an_sms_fits_in_one_message(templates: MessageTemplates, kind: Kind, language: str) -> None:
    message = _render(templates, kind, "sms", language)
    length = gsm7_length(message.body)
    assert length is not None and length <= 160, f"{length} septets: {message.body!r}"


def test_a_long_clinic_name_makes_two_messages_rather_than_fail(templates: MessageTemplates) -> None:
    # Not every name fits in one SMS with a 60-character link; the text is then sent in parts.
    message = _render(
        templates, "invitation", "sms", "nb", clinic_name="Distriktspsykiatrisk senter Nordre Vestfold"
    )
    length = gsm7_length(message.body)
    assert length is not None and length > 160


def test_the_expiry_is_oslo_local_time(templates: MessageTemplates) -> None:
    assert "14. juni kl. 09.00" in _render(templates, "invitation", "sms", "nb", expires_at=SUMMER).body
    assert "14 June at 09:00" in _render(templates, "invitation", "sms", "en", expires_at=SUMMER).body
    long = _render(templates, "invitation", "email", "nb", expires_at=SUMMER).body
    assert "lørdag 14. juni 2025 kl. 09.00" in long


def test_another_time_zone_can_be_configured() -> None:
    utc = MessageTemplates(timezone="UTC")
    assert (
        "14. mars kl. 07.00"
        in utc.render("invitation", "sms", "nb", clinic_name=CLINIC, link=LINK, expires_at=WINTER).body
    )


def test_without_an_expiry_the_sentence_is_left_out(templates: MessageTemplates) -> None:
    message = _render(templates, "invitation", "sms", "nb", expires_at=None)
    assert message.body == f"{CLINIC} ber deg fylle ut et skjema: {LINK}"


def test_the_code_sms_says_it_expires_in_ten_minutes(templates: MessageTemplates) -> None:
    assert "10 minutter" in _render(templates, "code", "sms", "nb").body
    assert "10 minutes" in _render(templates, "code", "sms", "en").body


@pytest.mark.parametrize(
    ("language", "expected"),
    [("nb", "nb"), ("en", "en"), ("en-GB", "en"), ("EN_us", "en"), ("nn", "nb"), ("de", "nb"), ("", "nb")],
)
def test_language_fallback(templates: MessageTemplates, language: str, expected: str) -> None:
    body = _render(templates, "invitation", "sms", language).body
    assert ("ber deg fylle ut" in body) == (expected == "nb")
    assert ("asks you to fill in" in body) == (expected == "en")


def test_a_site_template_overrides_the_built_in_one(tmp_path: Path) -> None:
    (tmp_path / "invitation.sms.nb.j2").write_text(
        "Hei fra {{ clinic_name }}! Svar her: {{ link }}\n", encoding="utf-8"
    )
    (tmp_path / "code.sms.nn.j2").write_text("Koden din er {{ code }}.", encoding="utf-8")
    site = MessageTemplates(tmp_path)

    assert _render(site, "invitation", "sms", "nb").body == f"Hei fra {CLINIC}! Svar her: {LINK}"
    # Files the site did not write stay the built-in ones; a language of the site's own is used.
    assert "asks you to fill in" in _render(site, "invitation", "sms", "en").body
    assert _render(site, "code", "sms", "nn").body == f"Koden din er {CODE}."


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__ }}",
        "{{ clinic_name.__class__.__mro__ }}",
        "{{ link.format.__globals__ }}",
        "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{{ c }}{% endfor %}",
    ],
)
def test_a_site_template_cannot_reach_python(tmp_path: Path, source: str) -> None:
    (tmp_path / "invitation.sms.nb.j2").write_text(source, encoding="utf-8")
    with pytest.raises(SecurityError):
        _render(MessageTemplates(tmp_path), "invitation", "sms", "nb")


def test_an_unknown_name_in_a_site_template_fails(tmp_path: Path) -> None:
    (tmp_path / "invitation.sms.nb.j2").write_text("{{ patient_name }} {{ link }}", encoding="utf-8")
    with pytest.raises(UndefinedError):
        _render(MessageTemplates(tmp_path), "invitation", "sms", "nb")


def test_an_email_template_needs_its_subject_line(tmp_path: Path) -> None:
    (tmp_path / "invitation.email.nb.j2").write_text("Hei!\n{{ link }}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="Subject"):
        _render(MessageTemplates(tmp_path), "invitation", "email", "nb")


def test_what_a_message_needs(templates: MessageTemplates) -> None:
    with pytest.raises(ValueError, match="link"):
        _render(templates, "invitation", "sms", "nb", link=None)
    with pytest.raises(ValueError, match="code"):
        _render(templates, "code", "sms", "nb", code=None)
    with pytest.raises(ValueError, match="timezone"):
        _render(templates, "reminder", "sms", "nb", expires_at=datetime(2025, 3, 14, 8, 0))
    with pytest.raises(ValueError, match="kind"):
        _render(templates, "diagnosis", "sms", "nb")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        MessageTemplates(Path("/nonexistent/templates"))


def test_gsm7_length() -> None:
    assert gsm7_length("Hei, Åse! Ærlig talt: ø") == 23
    assert gsm7_length("[€]") == 6
    assert gsm7_length("tankestrek \N{EN DASH} ikke GSM") is None
    assert gsm7_length("emoji 🙂") is None
