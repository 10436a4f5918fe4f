"""Message texts from Jinja2 templates, in bokmål and English, which a site may replace.

Built-in templates live in ``fhir_norse/messaging/templates/`` and are named
``{kind}.{channel}.{language}.j2``: kind ``invitation``, ``reminder`` or ``code`` (the one-time
code of the link's second step), channel ``sms`` or ``email``, language ``nb`` or ``en``. A file
of the same name in the site's folder (``message_templates_dir``) wins; a site may also add a
language of its own (``nn.j2``), used when the patient's language asks for it.

Site templates are edited by people who must not reach Python through them, so they run in
Jinja2's immutable sandbox (https://jinja.palletsprojects.com/en/3.1.x/sandbox/): ``{{
''.__class__ }}`` raises :class:`jinja2.exceptions.SecurityError`. Undefined names fail
(``StrictUndefined``) instead of leaving a hole in a text a patient reads. Autoescaping is off:
the output is plain text, never HTML.

A template sees ``clinic_name``, ``link``, ``code``, ``code_minutes`` and, when the link
expires, ``expires`` (short, "14. mars kl. 08.00" / "14 March at 08:00"), ``expires_long`` (with
weekday and year) and ``expires_at`` (the local datetime), all in the site's time zone. Messages
say nothing clinical: no questionnaire name, no diagnosis, only the clinic and the link.

An e-mail template's first line is ``Subject: ...``; it becomes the subject, the rest the body.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

from jinja2 import ChoiceLoader, FileSystemLoader, StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from fhir_norse.messaging.base import Channel

BUILTIN_DIR = Path(__file__).parent / "templates"

Kind = Literal["invitation", "reminder", "code"]
KINDS: tuple[Kind, ...] = ("invitation", "reminder", "code")
CHANNELS: tuple[Channel, ...] = ("sms", "email")
LANGUAGES = ("nb", "en")
DEFAULT_LANGUAGE = "nb"

# How long the one-time code of the "sms-code" second step is valid (the links' contract).
CODE_VALID_MINUTES = 10

# Month names as people write them in dates (the pages of fhir_norse/web format dates with them too).
MONTHS: Mapping[str, tuple[str, ...]] = {
    "nb": (
        "januar", "februar", "mars", "april", "mai", "juni",
        "juli", "august", "september", "oktober", "november", "desember",
    ),
    "en": (
        "January", "February", "March", "April", "May", "June",
        "July", "August", "September", "October", "November", "December",
    ),
}  # fmt: skip
_WEEKDAYS = {
    "nb": ("mandag", "tirsdag", "onsdag", "torsdag", "fredag", "lørdag", "søndag"),
    "en": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
}

# GSM 03.38: the default alphabet (one septet each) and its extension table (escape + one septet).
_GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")


def gsm7_length(text: str) -> int | None:
    """Septets ``text`` takes in the GSM 7-bit alphabet; None when it needs UCS-2.

    One SMS holds 160 septets; a text that is not GSM-7 falls back to UCS-2 and 70 characters.
    """
    length = 0
    for char in text:
        if char in _GSM7_BASIC:
            length += 1
        elif char in _GSM7_EXTENSION:
            length += 2
        else:
            return None
    return length


@dataclass(frozen=True, slots=True)
class RenderedMessage:
    subject: str | None
    body: str


def normalise_language(language: str | None) -> str:
    """The primary subtag of a BCP 47 tag, lower case ("en-GB" -> "en"); empty -> "nb"."""
    if not language:
        return DEFAULT_LANGUAGE
    return language.strip().replace("_", "-").split("-")[0].lower() or DEFAULT_LANGUAGE


def format_expiry(moment: datetime, language: str) -> tuple[str, str]:
    """(short, long) wording of a local moment: "14. mars kl. 08.00" / "fredag 14. mars 2025 kl. 08.00"."""
    lang = language if language in MONTHS else DEFAULT_LANGUAGE
    month = MONTHS[lang][moment.month - 1]
    weekday = _WEEKDAYS[lang][moment.weekday()]
    if lang == "en":
        clock = f"{moment:%H:%M}"
        return f"{moment.day} {month} at {clock}", f"{weekday} {moment.day} {month} {moment.year} at {clock}"
    # Norwegian writes the time with a full stop (Språkrådet: "kl. 08.00").
    clock = f"{moment:%H.%M}"
    return f"{moment.day}. {month} kl. {clock}", f"{weekday} {moment.day}. {month} {moment.year} kl. {clock}"


class MessageTemplates:
    """Renders the invitation, reminder and one-time-code messages."""

    def __init__(self, site_dir: Path | None = None, *, timezone: str = "Europe/Oslo") -> None:
        if site_dir is not None and not site_dir.is_dir():
            raise ValueError(f"the message templates folder {site_dir} does not exist")
        loaders = [FileSystemLoader(str(site_dir))] if site_dir is not None else []
        loaders.append(FileSystemLoader(str(BUILTIN_DIR)))
        self._zone = ZoneInfo(timezone)
        self._env = ImmutableSandboxedEnvironment(
            loader=ChoiceLoader(loaders),
            autoescape=False,
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=False,
        )

    def render(
        self,
        kind: Literal["invitation", "reminder", "code"],
        channel: Channel,
        language: str,
        *,
        clinic_name: str,
        link: str | None = None,
        expires_at: datetime | None = None,
        code: str | None = None,
    ) -> RenderedMessage:
        """The message of ``kind`` for ``channel`` in ``language`` ("nb" unless a template for it exists).

        Raises ``ValueError`` for an unknown kind or channel, an invitation or reminder without a
        link, a code message without a code, or an e-mail template without its subject line.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown message kind {kind!r}")
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}")
        if kind in ("invitation", "reminder") and not link:
            raise ValueError(f"an {kind} needs the link")
        if kind == "code" and not code:
            raise ValueError("a code message needs the code")
        wanted = normalise_language(language)
        names = [f"{kind}.{channel}.{wanted}.j2"]
        if wanted != DEFAULT_LANGUAGE:
            names.append(f"{kind}.{channel}.{DEFAULT_LANGUAGE}.j2")
        template = self._env.select_template(names)
        used = template.name.split(".")[2] if template.name else DEFAULT_LANGUAGE
        context: dict[str, Any] = {
            "clinic_name": clinic_name,
            "link": link,
            "code": code,
            "code_minutes": CODE_VALID_MINUTES,
            "language": used,
            "expires": None,
            "expires_long": None,
            "expires_at": None,
        }
        if expires_at is not None:
            if expires_at.tzinfo is None:
                raise ValueError("expires_at must be timezone-aware")
            local = expires_at.astimezone(self._zone)
            context["expires"], context["expires_long"] = format_expiry(local, used)
            context["expires_at"] = local
        text = template.render(context).replace("\r\n", "\n").strip()
        if channel == "sms":
            return RenderedMessage(subject=None, body=text)
        return _split_subject(text, template.name or "")


def _split_subject(text: str, name: str) -> RenderedMessage:
    first, _, rest = text.partition("\n")
    label, colon, subject = first.partition(":")
    if not colon or label.strip().lower() != "subject" or not subject.strip():
        raise ValueError(f"{name}: an e-mail template starts with a line 'Subject: ...'")
    return RenderedMessage(subject=subject.strip(), body=rest.strip())
