"""Rendering of the patient form's pages: Jinja2 templates (autoescape on), the texts in bokmål and
English, and the headers every page carries.

The headers follow OWASP's Secure Headers project (https://owasp.org/www-project-secure-headers/): a
Content-Security-Policy that allows nothing but this server's own style sheet, script and images (no
inline script or style anywhere, so the policy needs no ``unsafe-inline``), no caching of answer pages,
no referrer (the personal link is in the URL that opened the form), no framing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.responses import HTMLResponse, Response

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

CSP = (
    "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}

# The project's own wording (never a questionnaire's): what the pages around the questions say.
TEXTS: Mapping[str, Mapping[str, str]] = {
    "nb": {
        "site": "Spørreskjema",
        "skip": "Gå til innholdet",
        "language_switch": "English",
        "language_label": "Språk",
        "page_of": "Side {n} av {total}",
        "page_n": "Side {n}",
        "progress": "Hvor langt du har kommet",
        "back": "Tilbake",
        "next": "Neste",
        "to_review": "Se over svarene",
        "required": "Svar på dette spørsmålet for å gå videre.",
        "invalid": "Dette svaret kan ikke brukes. Velg et av alternativene.",
        "errors_title": "Noe mangler",
        "saved": (
            "Svarene dine lagres for hver side. Du kan lukke nettleseren og fortsette senere fra samme lenke."
        ),
        "review_title": "Se over svarene dine",
        "review_intro": (
            "Her er svarene dine. Trykk «Endre» for å gå tilbake til en side. Når "
            "alt ser riktig ut, sender du inn."
        ),
        "no_answer": "Ikke besvart",
        "change": "Endre",
        "change_page": "Endre svar på side {n}",
        "submit": "Send inn svarene",
        "thanks_title": "Takk for svarene dine",
        "thanks_body": "Svarene er sendt til behandleren din. Du kan lukke denne siden nå.",
        "scores_title": "Resultatene dine",
        "verify_title": "Bekreft at det er deg",
        "birthdate_intro": "Skriv inn fødselsdatoen din før du begynner.",
        "birthdate_label": "Fødselsdato",
        "birthdate_hint": "Skriv som dag.måned.år, for eksempel 31.01.1980.",
        "birthdate_wrong": "Fødselsdatoen stemmer ikke. Sjekk den og prøv igjen.",
        "code_intro": "Vi har sendt en kode på SMS til telefonen din. Skriv den inn her.",
        "code_label": "Kode fra SMS",
        "code_hint": "Koden har seks sifre.",
        "code_wrong": "Koden stemmer ikke, eller den er for gammel. Prøv igjen, eller be om en ny kode.",
        "code_resend": "Send meg en ny kode",
        "code_sent": "Vi har sendt en ny kode.",
        "continue": "Fortsett",
        "unknown_title": "Lenken virker ikke",
        "unknown_body": (
            "Vi fant ikke denne lenken. Sjekk at hele lenken er med, eller kontakt klinikken din."
        ),
        "expired_title": "Lenken er utløpt",
        "expired_body": "Denne lenken kan ikke brukes lenger. Kontakt klinikken din hvis du vil svare.",
        "revoked_title": "Lenken er trukket tilbake",
        "revoked_body": "Denne lenken kan ikke brukes lenger. Kontakt klinikken din hvis du har spørsmål.",
        "answered_title": "Du har allerede svart",
        "answered_body": "Du har allerede svart på dette skjemaet. Takk!",
        "cancelled_title": "Skjemaet er avlyst",
        "cancelled_body": (
            "Du trenger ikke å svare på dette skjemaet. Kontakt klinikken din hvis du har spørsmål."
        ),
        "closed_title": "Fristen er ute",
        "closed_body": "Tiden for å svare på dette skjemaet er ute. Kontakt klinikken din hvis du vil svare.",
        "not_yet_title": "Skjemaet er ikke åpent ennå",
        "not_yet_body": "Du kan svare fra {start}. Åpne lenken igjen da.",
        "not_yet_body_plain": "Du kan ikke svare ennå. Åpne lenken igjen senere.",
        "throttled_title": "For mange forsøk",
        "throttled_body": "Det har vært for mange forsøk fra denne enheten. Vent litt og prøv igjen.",
        "session_title": "Økten er avsluttet",
        "session_body": (
            "Åpne lenken fra meldingen du fikk på nytt for å fortsette. Har du "
            "allerede sendt inn svarene, er du ferdig. Takk!"
        ),
        "forbidden_title": "Noe gikk galt",
        "forbidden_body": "Siden var for gammel til å sendes inn. Gå tilbake og prøv igjen.",
        "locked_title": "For mange forsøk",
        "locked_body": "Du har prøvd for mange ganger. Kontakt klinikken din for å få hjelp.",
        "not_found_title": "Siden finnes ikke",
        "not_found_body": "Denne siden finnes ikke i skjemaet.",
        "error_title": "Noe gikk galt",
        "error_body": (
            "Vi kunne ikke lagre eller vise skjemaet akkurat nå. Prøv igjen om "
            "litt, eller kontakt klinikken din."
        ),
        "start_over": "Gå til skjemaet",
    },
    "en": {
        "site": "Questionnaire",
        "skip": "Skip to the content",
        "language_switch": "Norsk (bokmål)",
        "language_label": "Language",
        "page_of": "Page {n} of {total}",
        "page_n": "Page {n}",
        "progress": "How far you have come",
        "back": "Back",
        "next": "Next",
        "to_review": "Review your answers",
        "required": "Answer this question to go on.",
        "invalid": "This answer cannot be used. Choose one of the options.",
        "errors_title": "Something is missing",
        "saved": (
            "Your answers are saved on every page. You can close the browser and "
            "continue later from the same link."
        ),
        "review_title": "Review your answers",
        "review_intro": (
            "These are your answers. Press “Change” to go back to a page. When "
            "everything looks right, send them."
        ),
        "no_answer": "Not answered",
        "change": "Change",
        "change_page": "Change the answers on page {n}",
        "submit": "Send your answers",
        "thanks_title": "Thank you for your answers",
        "thanks_body": "Your answers have been sent to your clinician. You can close this page now.",
        "scores_title": "Your results",
        "verify_title": "Confirm that it is you",
        "birthdate_intro": "Enter your date of birth before you start.",
        "birthdate_label": "Date of birth",
        "birthdate_hint": "Write it as day.month.year, for example 31.01.1980.",
        "birthdate_wrong": "The date of birth does not match. Check it and try again.",
        "code_intro": "We have sent a code by text message to your phone. Enter it here.",
        "code_label": "Code from the text message",
        "code_hint": "The code has six digits.",
        "code_wrong": "The code does not match, or it is too old. Try again, or ask for a new code.",
        "code_resend": "Send me a new code",
        "code_sent": "We have sent a new code.",
        "continue": "Continue",
        "unknown_title": "The link does not work",
        "unknown_body": (
            "We could not find this link. Check that the whole link is there, or contact your clinic."
        ),
        "expired_title": "The link has expired",
        "expired_body": "This link can no longer be used. Contact your clinic if you want to answer.",
        "revoked_title": "The link has been withdrawn",
        "revoked_body": "This link can no longer be used. Contact your clinic if you have questions.",
        "answered_title": "You have already answered",
        "answered_body": "You have already answered this questionnaire. Thank you!",
        "cancelled_title": "The questionnaire was cancelled",
        "cancelled_body": (
            "You do not need to answer this questionnaire. Contact your clinic if you have questions."
        ),
        "closed_title": "The time to answer is over",
        "closed_body": (
            "The time to answer this questionnaire is over. Contact your clinic if you want to answer."
        ),
        "not_yet_title": "The questionnaire is not open yet",
        "not_yet_body": "You can answer from {start}. Open the link again then.",
        "not_yet_body_plain": "You cannot answer yet. Open the link again later.",
        "throttled_title": "Too many attempts",
        "throttled_body": "There have been too many attempts from this device. Wait a little and try again.",
        "session_title": "The session has ended",
        "session_body": (
            "Open the link from your message again to continue. If you have "
            "already sent your answers, you are done. Thank you!"
        ),
        "forbidden_title": "Something went wrong",
        "forbidden_body": "The page was too old to be sent. Go back and try again.",
        "locked_title": "Too many attempts",
        "locked_body": "You have tried too many times. Contact your clinic for help.",
        "not_found_title": "The page does not exist",
        "not_found_body": "This page does not exist in the questionnaire.",
        "error_title": "Something went wrong",
        "error_body": (
            "We could not save or show the questionnaire just now. Try again in a "
            "little while, or contact your clinic."
        ),
        "start_over": "Go to the questionnaire",
    },
}


def texts(language: str) -> Mapping[str, str]:
    return TEXTS.get(language, TEXTS["nb"])


class Pages:
    """The template environment (built once) and the responses it renders."""

    def __init__(self) -> None:
        self.env = Environment(
            loader=FileSystemLoader(TEMPLATES),
            autoescape=select_autoescape(default=True, default_for_string=True),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )

    def render(
        self,
        template: str,
        language: str,
        *,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        **values: Any,
    ) -> Response:
        context = {
            "lang": language,
            "t": texts(language),
            "other": None,
            "csrf": None,
            "here": None,
            **values,
        }
        html = self.env.get_template(template).render(**context)
        response = HTMLResponse(html, status_code=status)
        secure(response, headers)
        return response

    def message(
        self,
        key: str,
        *,
        status: int,
        language: str = "nb",
        headers: Mapping[str, str] | None = None,
        link: str | None = None,
        **fmt: str,
    ) -> Response:
        """A plain page saying what happened and what to do, in ``language`` with a line in the other
        language (bokmål first by default, with an English line)."""
        other = "en" if language != "en" else "nb"
        main = texts(language)
        second = texts(other)
        return self.render(
            "message.html",
            language,
            status=status,
            headers=headers,
            title=main[f"{key}_title"],
            body=_body(main, key, fmt),
            second_lang=other,
            second_title=second[f"{key}_title"],
            second_body=_body(second, key, fmt),
            link=link,
        )


def _body(catalogue: Mapping[str, str], key: str, fmt: Mapping[str, str]) -> str:
    return catalogue[f"{key}_body"].format(**fmt)


def secure(response: Response, extra: Mapping[str, str] | None = None) -> Response:
    """Put the security headers (module doc) on a response."""
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    for name, value in (extra or {}).items():
        response.headers[name] = value
    return response
