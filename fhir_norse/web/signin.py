"""The pages people see while an app signs them in (issue 16, SMART App Launch): the consent page, the
clinician's patient picker and the refusal pages, in bokmål and English.

The routes (:mod:`fhir_norse.api.smart_routes`) decide what happens; this module only says it, in plain
words. What an app asks for arrives as SMART scopes
(https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html); :func:`describe_scopes` turns
them into one line per thing the person decides on ("See your scores and measurements"), and the consent
page shows one ticked checkbox per line, so the person can allow fewer scopes than the app asked for
(issue 16, item 5).

Decisions a reader may ask about:

* **Which scopes become lines.** Each clinical scope (``patient/``, ``user/``, ``system/``; v1 and v2,
  wildcard and granular) is one line. ``openid``, ``fhirUser`` and ``profile`` together are one line
  ("Know who you are"), whose ``scope`` holds them space-separated: the route splits every submitted
  ``scope`` value on whitespace. ``offline_access`` and ``online_access`` are a line each. ``launch``,
  ``launch/patient`` and ``launch/encounter`` are *not* lines: they are the context (which patient the
  app works on), shown in the page's header, and they follow the decision on the resource lines.
  Scopes :class:`~fhir_norse.auth.scopes.ScopeSet` finds invalid get no line and so can never be allowed
  here (the authorize route refuses them with ``invalid_scope`` before anyone sees this page).
* **What can be refused.** Every line :func:`describe_scopes` makes can be refused, identity and
  offline access included: the app then gets no id_token, or no refresh token. A person who unticks
  everything has allowed nothing, which the route treats as a denial. ``ScopeLine.can_refuse=False``
  exists for a route that must keep a scope; such a line is shown without a checkbox and its scope is
  sent in a hidden field.
* **Whose data.** The words depend on who signs in: a patient reads "your answers"; a clinician reads
  "the patient's answers" for ``patient/`` scopes (the patient in context) and "your patients' answers"
  for ``user/`` scopes (the patients of their care teams and episodes).

The pages need no JavaScript and carry no inline script or style, so they run under the same
Content-Security-Policy as the patient form (:mod:`fhir_norse.web.pages`), except that the consent page
must let its form lead to the app: :func:`signin_headers` adds the app's origin to ``form-action``
(browsers apply ``form-action`` to the redirect that follows a form post). The style sheets are the
patient form's plus ``signin.css``, served under ``/static/form/`` by :mod:`fhir_norse.web.routes`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from fhir_norse.auth.scopes import InvalidScope, ResourceScope
from fhir_norse.messaging.templates import MONTHS
from fhir_norse.web.pages import SECURITY_HEADERS

__all__ = [
    "REFUSAL_KINDS",
    "STYLESHEETS",
    "ConsentView",
    "Lang",
    "PickerView",
    "RefusalView",
    "Role",
    "ScopeLine",
    "SigninPages",
    "allowed_scopes",
    "describe_scopes",
    "format_birth_date",
    "refusal_text",
    "scope_context",
    "signin_headers",
]

Lang = Literal["nb", "en"]
Role = Literal["patient", "clinician"]

TEMPLATES = Path(__file__).resolve().parent / "templates" / "signin"
# Served by the patient form's static mount (fhir_norse/web/routes.py), which is always installed.
STYLESHEETS: tuple[str, ...] = ("/static/form/form.css", "/static/form/signin.css")

IDENTITY_SCOPES: tuple[str, ...] = ("openid", "fhirUser", "profile")
CONTEXT_SCOPES: frozenset[str] = frozenset({"launch", "launch/patient", "launch/encounter"})
_REFRESH: tuple[str, ...] = ("offline_access", "online_access")


# -- what the scopes mean, in people's words ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScopeLine:
    """One thing the person decides on. ``scope`` is what the checkbox sends: one scope, or several
    separated by spaces that stand or fall together (the identity line). ``detail`` says more where the
    short ``text`` cannot (exactly which permissions, a granular scope's restriction)."""

    scope: str
    text: str
    detail: str | None
    can_refuse: bool


@dataclass(frozen=True, slots=True)
class _Noun:
    """A resource type in people's words. ``nb`` is the definite plural with ``{p}`` where a possessive
    goes ("svarene{p} på spørreskjemaer" -> "svarene dine på spørreskjemaer"); ``poss`` agrees with it.
    ``personal`` is False for types that are not about a patient (questionnaires, clinicians): those are
    named without an owner, ``nb_plain`` being the indefinite form."""

    nb: str
    en: str
    personal: bool = True
    poss: str = "dine"
    nb_plain: str = ""


NOUNS: Mapping[str, _Noun] = {
    "Observation": _Noun("skårene og målingene{p}", "scores and measurements"),
    "QuestionnaireResponse": _Noun("svarene{p} på spørreskjemaer", "answers to questionnaires"),
    "Patient": _Noun(
        "navnet, fødselsdatoen og kontaktopplysningene{p}", "name, date of birth and contact details"
    ),
    "Flag": _Noun("varslene{p}", "alerts"),
    "Task": _Noun("oppgavene{p}", "tasks, such as questionnaires to fill in"),
    "DiagnosticReport": _Noun("rapportene{p}", "reports"),
    "Condition": _Noun("diagnosene og helseproblemene{p}", "diagnoses and health problems"),
    "EpisodeOfCare": _Noun("behandlingsforløpene{p}", "courses of treatment"),
    "CareTeam": _Noun("behandlerteamene{p}", "care teams"),
    "Encounter": _Noun("konsultasjonene{p}", "consultations and visits"),
    "Appointment": _Noun("timeavtalene{p}", "appointments"),
    "Communication": _Noun("meldingene{p}", "messages"),
    "CommunicationRequest": _Noun("meldingene{p} som skal sendes", "messages to be sent"),
    "Consent": _Noun("samtykkene{p}", "consents"),
    "DocumentReference": _Noun("dokumentene{p}", "documents"),
    "CarePlan": _Noun("behandlingsplanene{p}", "care plans"),
    "Goal": _Noun("behandlingsmålene{p}", "treatment goals"),
    "MedicationStatement": _Noun("legemidlene{p}", "medicines"),
    "MedicationRequest": _Noun("reseptene{p}", "prescriptions"),
    "AllergyIntolerance": _Noun("allergiene{p}", "allergies"),
    "Procedure": _Noun("behandlingene og inngrepene{p}", "treatments and procedures"),
    "ServiceRequest": _Noun("henvisningene og bestillingene{p}", "referrals and orders"),
    "RelatedPerson": _Noun("opplysningene{p} om pårørende", "details of next of kin"),
    "AuditEvent": _Noun(
        "loggen{p} over hvem som har sett og endret opplysninger",
        "log of who has seen and changed information",
        poss="din",
    ),
    "Provenance": _Noun("opplysningene{p} om hvem som har registrert hva", "records of who entered what"),
    "Questionnaire": _Noun("", "questionnaires", personal=False, nb_plain="spørreskjemaer"),
    "Practitioner": _Noun(
        "", "information about clinicians", personal=False, nb_plain="opplysninger om behandlere"
    ),
    "PractitionerRole": _Noun("", "clinicians' roles", personal=False, nb_plain="behandlernes roller"),
    "Organization": _Noun(
        "", "information about organisations", personal=False, nb_plain="opplysninger om virksomheter"
    ),
    "Location": _Noun("", "places of treatment", personal=False, nb_plain="behandlingssteder"),
    "HealthcareService": _Noun("", "health services", personal=False, nb_plain="helsetjenester"),
    "ValueSet": _Noun("", "code lists", personal=False, nb_plain="kodelister"),
    "CodeSystem": _Noun("", "code systems", personal=False, nb_plain="kodeverk"),
    "Library": _Noun("", "scoring rules", personal=False, nb_plain="skåringsregler"),
    "Group": _Noun("", "patient groups", personal=False, nb_plain="pasientgrupper"),
}


def _unknown_noun(resource_type: str) -> _Noun:
    # Named by its FHIR name, and counted as personal: a person is better warned than reassured.
    return _Noun(f"opplysningene{{p}} av typen «{resource_type}»", f"records of type “{resource_type}”")


# Owners: "own" (the person's own data), "patient" (a clinician's patient in context), "patients" (a
# clinician's patients), "all" (system scopes: every patient on the server).
_Owner = Literal["own", "patient", "patients", "all"]

_NB_OWNER_SUFFIX: Mapping[str, str] = {
    "patient": "til pasienten",
    "patients": "til pasientene dine",
    "all": "for alle pasienter",
}
_EN_OWNER_PREFIX: Mapping[str, str] = {
    "own": "your",
    "patient": "the patient's",
    "patients": "your patients'",
    "all": "all patients'",
}
_WILDCARD: Mapping[str, Mapping[str, str]] = {
    "nb": {
        "own": "alle opplysninger om deg",
        "patient": "alle opplysninger om pasienten",
        "patients": "alle opplysninger om pasientene dine",
        "all": "alle opplysninger om alle pasienter",
    },
    "en": {
        "own": "all information about you",
        "patient": "all information about the patient",
        "patients": "all information about your patients",
        "all": "all information about all patients",
    },
}


def _owner(context: str, role: Role) -> _Owner:
    if context == "system":
        return "all"
    if role == "patient":
        # A patient's user/ scopes reach only their own records, like patient/ scopes.
        return "own"
    return "patient" if context == "patient" else "patients"


def _object(resource_type: str, owner: _Owner, lang: Lang) -> str:
    if resource_type == "*":
        return _WILDCARD[lang][owner]
    noun = NOUNS.get(resource_type) or _unknown_noun(resource_type)
    if not noun.personal:
        return noun.en if lang == "en" else noun.nb_plain
    if lang == "en":
        return f"{_EN_OWNER_PREFIX[owner]} {noun.en}"
    if owner == "own":
        return noun.nb.format(p=f" {noun.poss}")
    return f"{noun.nb.format(p='')} {_NB_OWNER_SUFFIX[owner]}"


# The permissions in the order the SMART page lists them (c r u d s), and in words.
_VERBS: Mapping[str, Mapping[str, str]] = {
    "nb": {"c": "legge til", "r": "se", "u": "endre", "d": "slette", "s": "søke i"},
    "en": {"c": "add", "r": "see", "u": "change", "d": "delete", "s": "search"},
}
_PERMISSION_ORDER = "rscud"


def _summary_verb(permissions: frozenset[str], lang: Lang) -> str:
    """The short verb of a line: reading (r, s) is "see", writing (c, u, d) is "change", a scope that
    only adds or only deletes says so; the detail lists the exact permissions whenever it writes."""
    reads, writes = permissions & {"r", "s"}, permissions & {"c", "u", "d"}
    nb = lang == "nb"
    if not writes:
        return "Se" if nb else "See"
    if writes == {"c"}:
        write = "legge til i" if nb else "add to"
    elif writes == {"d"}:
        write = "slette" if nb else "delete"
    else:
        write = "endre" if nb else "change"
    if not reads:
        return write[0].upper() + write[1:]
    return f"Se og {write}" if nb else f"See and {write}"


def _permission_detail(permissions: frozenset[str], lang: Lang) -> str | None:
    # Needed where the short verb is "change", which stands for several permissions.
    if permissions & {"c", "u", "d"} in (set(), {"c"}, {"d"}):
        return None
    words = [_VERBS[lang][p] for p in _PERMISSION_ORDER if p in permissions]
    listed = _join(words, lang)
    return f"Appen kan {listed}." if lang == "nb" else f"The app can {listed}."


def _join(words: list[str], lang: Lang, last: str | None = None) -> str:
    conjunction = last or ("og" if lang == "nb" else "and")
    if len(words) == 1:
        return words[0]
    return f"{', '.join(words[:-1])} {conjunction} {words[-1]}"


# Granular scopes: the search parameters and codes people are likely to meet, in words.
_PARAMETERS: Mapping[str, Mapping[str, str]] = {
    "nb": {
        "category": "kategorien",
        "code": "koden",
        "status": "statusen",
        "date": "datoen",
        "_tag": "merket",
    },
    "en": {
        "category": "the category",
        "code": "the code",
        "status": "the status",
        "date": "the date",
        "_tag": "the tag",
    },
}
_CODES: Mapping[str, Mapping[str, str]] = {
    "nb": {
        "survey": "spørreskjema",
        "vital-signs": "vitale tegn",
        "laboratory": "laboratorieprøver",
        "social-history": "livssituasjon",
        "exam": "undersøkelse",
        "therapy": "behandling",
        "activity": "aktivitet",
        "imaging": "bildediagnostikk",
        "procedure": "prosedyre",
    },
    "en": {
        "survey": "questionnaire",
        "vital-signs": "vital signs",
        "laboratory": "laboratory tests",
        "social-history": "life situation",
        "exam": "examination",
        "therapy": "therapy",
        "activity": "activity",
        "imaging": "imaging",
        "procedure": "procedure",
    },
}


def _restriction_detail(restrictions: tuple[tuple[str, str], ...], lang: Lang) -> str:
    open_q, close_q = ("«", "»") if lang == "nb" else ("“", "”")
    clauses = []
    for name, value in restrictions:
        label = _PARAMETERS[lang].get(name, f"{open_q}{name}{close_q}")
        # A token search value may be "system|code"; a comma means "or".
        codes = [_CODES[lang].get(code, code) for code in (v.rpartition("|")[2] for v in value.split(","))]
        quoted = [f"{open_q}{code}{close_q}" for code in codes]
        either = _join(quoted, lang, "eller" if lang == "nb" else "or")
        clauses.append(f"{label} er {either}" if lang == "nb" else f"{label} is {either}")
    joined = _join(clauses, lang)
    return f"Bare de der {joined}." if lang == "nb" else f"Only those where {joined}."


def _resource_line(scope: ResourceScope, role: Role, lang: Lang) -> ScopeLine:
    what = _object(scope.resource_type, _owner(scope.context, role), lang)
    text = f"{_summary_verb(scope.permissions, lang)} {what}"
    details = []
    if scope.restrictions:
        details.append(_restriction_detail(scope.restrictions, lang))
    permissions = _permission_detail(scope.permissions, lang)
    if permissions:
        details.append(permissions)
    return ScopeLine(scope.text, text, " ".join(details) or None, can_refuse=True)


_SPECIAL: Mapping[str, Mapping[str, tuple[str, str | None]]] = {
    "nb": {
        "identity": (
            "Vite hvem du er (navnet ditt)",
            "Appen får vite navnet ditt og hvem du er i systemet her.",
        ),
        "offline_access": (
            "Beholde tilgangen når du ikke bruker appen (til du trekker den tilbake)",
            "Uten dette må du logge inn på nytt når tilgangen går ut.",
        ),
        "online_access": (
            "Beholde tilgangen mens du er logget inn",
            "Uten dette må du logge inn på nytt når tilgangen går ut.",
        ),
    },
    "en": {
        "identity": (
            "Know who you are (your name)",
            "The app learns your name and who you are in this system.",
        ),
        "offline_access": (
            "Keep access when you are not using the app (until you withdraw it)",
            "Without this you sign in again when the access runs out.",
        ),
        "online_access": (
            "Keep access while you are signed in",
            "Without this you sign in again when the access runs out.",
        ),
    },
}


def _special(key: str, scope: str, lang: Lang) -> ScopeLine:
    text, detail = _SPECIAL[lang][key]
    return ScopeLine(scope, text, detail, can_refuse=True)


def describe_scopes(scopes: Iterable[str] | str, lang: Lang, *, role: Role = "patient") -> list[ScopeLine]:
    """One line per scope (or group of scopes) the person decides on, in the order: who you are, the
    data (as asked, duplicates once), how long access lasts. ``role`` is who signs in; it decides whose
    data the words name (module doc). A string is taken as a space-separated scope list."""
    items = scopes.split() if isinstance(scopes, str) else [s for scope in scopes for s in scope.split()]
    lang = _lang(lang)
    lines: list[ScopeLine] = []
    identity = [s for s in IDENTITY_SCOPES if s in items]
    if identity:
        lines.append(_special("identity", " ".join(identity), lang))
    seen: set[str] = set()
    for item in items:
        if item in seen or item in IDENTITY_SCOPES or item in CONTEXT_SCOPES or item in _REFRESH:
            continue
        seen.add(item)
        try:
            parsed = ResourceScope.parse(item)
        except InvalidScope:
            continue  # no line: an invalid scope can never be allowed here (module doc)
        lines.append(_resource_line(parsed, role, lang))
    for refresh in _REFRESH:
        if refresh in items:
            lines.append(_special(refresh, refresh, lang))
    return lines


def allowed_scopes(lines: Iterable[ScopeLine], submitted: Iterable[str]) -> list[str]:
    """The scopes a consent form allows: the ticked ``scope`` values that match a line shown, split on
    whitespace, plus the lines that cannot be refused. A value the page never offered is ignored, so a
    tampered form cannot widen the grant (the route still intersects with what was asked)."""
    offered = {line.scope for line in lines}
    chosen = {value for value in submitted if value in offered}
    chosen |= {line.scope for line in lines if not line.can_refuse}
    ordered = [line.scope for line in lines if line.scope in chosen]
    return [scope for group in ordered for scope in group.split()]


def scope_context(scopes: Iterable[str] | str) -> list[str]:
    """The launch-context scopes of a request (``launch``, ``launch/patient``, ``launch/encounter``):
    not lines of their own, they go with whatever resource scopes the person allows."""
    items = scopes.split() if isinstance(scopes, str) else [s for scope in scopes for s in scope.split()]
    return [s for s in dict.fromkeys(items) if s in CONTEXT_SCOPES]


def _lang(lang: str) -> Lang:
    return "en" if lang == "en" else "nb"


# -- refusals ---------------------------------------------------------------------------------------------

_REFUSALS: Mapping[str, Mapping[str, tuple[str, str, str | None]]] = {
    "nb": {
        "unknown-client": (
            "Vi kjenner ikke denne appen",
            "Appen som sendte deg hit, er ikke registrert her, så den kan ikke få tilgang.",
            "Lukk siden og åpne appen på nytt. Virker det fortsatt ikke, ta kontakt med dem som laget appen.",
        ),
        "redirect-mismatch": (
            "Appen er ikke satt opp riktig",
            "Appen ba om å få deg sendt tilbake til en adresse den ikke er registrert med. For å beskytte "
            "opplysningene dine stopper vi her.",
            "Du har ikke gjort noe feil. Ta kontakt med dem som laget appen.",
        ),
        "no-patient-match": (
            "Vi fant deg ikke",
            "Vi fant deg ikke i pasientlisten her.",
            "Ta kontakt med behandlingsstedet.",
        ),
        "several-patient-matches": (
            "Vi kan ikke vite sikkert hvem du er",
            "Du passer med mer enn én pasient i pasientlisten her, så vi kan ikke åpne opplysningene dine.",
            "Ta kontakt med behandlingsstedet, så kan de rette det opp.",
        ),
        "no-practitioner-match": (
            "Vi fant deg ikke blant behandlerne",
            "Du er logget inn, men vi fant deg ikke blant behandlerne her.",
            "Ta kontakt med den som har ansvar for tilganger hos behandlingsstedet.",
        ),
        "several-practitioner-matches": (
            "Vi kan ikke vite sikkert hvem du er",
            "Du passer med mer enn én behandler her, så vi kan ikke gi deg tilgang.",
            "Ta kontakt med den som har ansvar for tilganger hos behandlingsstedet, så kan de rette det opp.",
        ),
        "outside-care-team": (
            "Du har ikke tilgang til denne pasienten",
            "Du er ikke med i behandlerteamet eller behandlingsforløpet til denne pasienten.",
            "Be den som er ansvarlig for pasienten om å legge deg til, og prøv igjen.",
        ),
        "launch-invalid": (
            "Appen kunne ikke startes fra journalen",
            "Oppstarten fra journalsystemet er for gammel, er brukt før, eller hører ikke til denne appen.",
            "Gå tilbake til journalsystemet og åpne appen på nytt derfra.",
        ),
        "login-failed": (
            "Innloggingen ble ikke fullført",
            "Innloggingen ble avbrutt eller gikk ikke gjennom.",
            "Gå tilbake til appen og prøv igjen. Går det fortsatt ikke, vent litt og prøv på nytt.",
        ),
        "login-not-configured": (
            "Innlogging er ikke tilgjengelig",
            "Innlogging for apper er ikke satt opp her ennå.",
            "Ta kontakt med behandlingsstedet.",
        ),
        "request-expired": (
            "Det tok for lang tid",
            "Innloggingen må fullføres innen en viss tid, og den tiden er gått.",
            "Gå tilbake til appen og start på nytt.",
        ),
        "session-mismatch": (
            "Siden hører til en annen innlogging",
            "Siden ble åpnet i en annen nettleser eller et annet vindu enn der innloggingen startet, "
            "eller innloggingen er avsluttet.",
            "Gå tilbake til appen og start på nytt i samme nettleser.",
        ),
        "app-revoked": (
            "Appen er stengt",
            "Appen har ikke lenger lov til å bruke opplysninger her.",
            "Ta kontakt med behandlingsstedet hvis du har spørsmål.",
        ),
        "no-patients": (
            "Du har ingen pasienter her",
            "Du er ikke med i behandlerteamet eller behandlingsforløpet til noen pasient her.",
            "Be den som er ansvarlig for pasienten om å legge deg til, og prøv igjen.",
        ),
        "signed-out": (
            "Du er logget ut",
            "Du er logget ut her. Apper som bare hadde tilgang mens du var logget inn, har mistet den.",
            "Du kan lukke denne siden.",
        ),
        "error": (
            "Noe gikk galt",
            "Vi kunne ikke fullføre innloggingen akkurat nå.",
            "Prøv igjen om litt. Går det fortsatt ikke, ta kontakt med behandlingsstedet.",
        ),
    },
    "en": {
        "unknown-client": (
            "We do not know this app",
            "The app that sent you here is not registered here, so it cannot be given access.",
            "Close this page and open the app again. If it still does not work, contact the people who "
            "made the app.",
        ),
        "redirect-mismatch": (
            "The app is not set up correctly",
            "The app asked us to send you back to an address it is not registered with. To protect your "
            "information, we stop here.",
            "You have done nothing wrong. Contact the people who made the app.",
        ),
        "no-patient-match": (
            "We could not find you",
            "We could not find you in the list of patients here.",
            "Contact your place of treatment.",
        ),
        "several-patient-matches": (
            "We cannot be sure who you are",
            "You match more than one patient in the list of patients here, so we cannot open your "
            "information.",
            "Contact your place of treatment so that they can put it right.",
        ),
        "no-practitioner-match": (
            "We could not find you among the clinicians",
            "You are signed in, but we could not find you among the clinicians here.",
            "Contact the person responsible for access at your place of work.",
        ),
        "several-practitioner-matches": (
            "We cannot be sure who you are",
            "You match more than one clinician here, so we cannot give you access.",
            "Contact the person responsible for access at your place of work so that they can put it right.",
        ),
        "outside-care-team": (
            "You do not have access to this patient",
            "You are not in this patient's care team or course of treatment.",
            "Ask the person responsible for the patient to add you, and try again.",
        ),
        "launch-invalid": (
            "The app could not be started from the record",
            "The start from the record system is too old, has been used before, or does not belong to "
            "this app.",
            "Go back to the record system and open the app again from there.",
        ),
        "login-failed": (
            "The sign-in was not completed",
            "The sign-in was cancelled or did not go through.",
            "Go back to the app and try again. If it still does not work, wait a little and try again.",
        ),
        "login-not-configured": (
            "Sign-in is not available",
            "Sign-in for apps has not been set up here yet.",
            "Contact your place of treatment.",
        ),
        "request-expired": (
            "It took too long",
            "The sign-in must be finished within a certain time, and that time has passed.",
            "Go back to the app and start again.",
        ),
        "session-mismatch": (
            "This page belongs to another sign-in",
            "The page was opened in another browser or window than the one where the sign-in started, "
            "or the sign-in has ended.",
            "Go back to the app and start again in the same browser.",
        ),
        "app-revoked": (
            "The app has been shut off",
            "The app is no longer allowed to use information here.",
            "Contact your place of treatment if you have questions.",
        ),
        "no-patients": (
            "You have no patients here",
            "You are not in the care team or course of treatment of any patient here.",
            "Ask the person responsible for the patient to add you, and try again.",
        ),
        "signed-out": (
            "You are signed out",
            "You are signed out here. Apps that had access only while you were signed in have lost it.",
            "You can close this page.",
        ),
        "error": (
            "Something went wrong",
            "We could not finish the sign-in just now.",
            "Try again in a little while. If it still does not work, contact your place of treatment.",
        ),
    },
}
REFUSAL_KINDS: frozenset[str] = frozenset(_REFUSALS["nb"])


def refusal_text(kind: str, lang: Lang) -> tuple[str, str, str | None]:
    """(title, message, advice) of a refusal page. An unknown ``kind`` is a programming error
    (:class:`ValueError`), not something to paper over with a vague page."""
    try:
        return _REFUSALS[_lang(lang)][kind]
    except KeyError:
        raise ValueError(f"unknown refusal kind {kind!r}; expected one of {sorted(REFUSAL_KINDS)}") from None


# -- the pages --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsentView:
    """The consent page. ``patient_name``/``patient_birth_date``: the patient in context (a clinician's
    launch or pick); ``clinic``: the place whose records these are (``Settings.clinic_name``)."""

    lang: Lang
    app_name: str
    person_name: str
    role: str
    patient_name: str | None
    patient_birth_date: str | None
    lines: list[ScopeLine]
    action: str
    csrf: str
    request_id: str
    other_lang_url: str
    clinic: str | None = None


@dataclass(frozen=True, slots=True)
class PickerView:
    """The clinician's patient picker; ``patients`` are (id, name, birth date or None), already limited
    to the clinician's own patients and filtered by ``query``."""

    lang: Lang
    app_name: str
    person_name: str
    patients: list[tuple[str, str, str | None]]
    action: str
    csrf: str
    request_id: str
    query: str
    other_lang_url: str


@dataclass(frozen=True, slots=True)
class RefusalView:
    lang: Lang
    title: str
    message: str
    advice: str | None
    other_lang_url: str | None


TEXTS: Mapping[str, Mapping[str, str]] = {
    "nb": {
        "site": "Innlogging for apper",
        "skip": "Gå til innholdet",
        "other_lang": "English",
        "other_lang_code": "en",
        "consent_title": "Gi tilgang til «{app}»",
        "consent_heading": "«{app}» ber om tilgang",
        "asks_own": "Appen «{app}» ber om tilgang til opplysningene dine",
        "asks_patient": "Appen «{app}» ber om tilgang til opplysninger om pasienten {patient}",
        "born": ", født {born}",
        "asks_patients": "Appen «{app}» ber om tilgang til opplysninger om pasientene dine",
        "at_clinic": " hos {clinic}",
        "signed_in_as": "Du er logget inn som {person}.",
        "context_own": "Appen får bare tilgang til opplysninger om deg.",
        "context_patient": "Appen får vite at det er denne pasienten du arbeider med.",
        "context_patients": "Appen får bare tilgang til pasientene du har ansvar for.",
        "lines_legend": "Dette ber appen om",
        "lines_hint": "Fjern haken ved det du ikke vil tillate.",
        "always": "Alltid med",
        "nothing_asked": "Appen ber ikke om tilgang til noe her.",
        "allow": "Tillat",
        "deny": "Avvis",
        "deny_note": "Avviser du, får appen ingen tilgang.",
        "picker_title": "Velg pasient",
        "picker_intro": "Appen «{app}» arbeider med én pasient om gangen. Velg hvem.",
        "picker_scope": "Listen viser bare pasientene du har ansvar for.",
        "search_label": "Søk etter navn",
        "search": "Søk",
        "patients_legend": "Pasienter",
        "patient_label": "{name} (født {born})",
        "no_match": "Ingen av pasientene dine passer med «{query}».",
        "show_all": "Vis alle pasientene",
        "choose": "Velg",
    },
    "en": {
        "site": "Sign-in for apps",
        "skip": "Skip to the content",
        "other_lang": "Norsk (bokmål)",
        "other_lang_code": "nb",
        "consent_title": "Give access to “{app}”",
        "consent_heading": "“{app}” asks for access",
        "asks_own": "The app “{app}” asks for access to your information",
        "asks_patient": "The app “{app}” asks for access to information about the patient {patient}",
        "born": ", born {born}",
        "asks_patients": "The app “{app}” asks for access to information about your patients",
        "at_clinic": " at {clinic}",
        "signed_in_as": "You are signed in as {person}.",
        "context_own": "The app only gets access to information about you.",
        "context_patient": "The app is told that this is the patient you are working with.",
        "context_patients": "The app only gets access to the patients you are responsible for.",
        "lines_legend": "What the app asks for",
        "lines_hint": "Untick anything you do not want to allow.",
        "always": "Always included",
        "nothing_asked": "The app does not ask for access to anything here.",
        "allow": "Allow",
        "deny": "Deny",
        "deny_note": "If you deny, the app gets no access.",
        "picker_title": "Choose a patient",
        "picker_intro": "The app “{app}” works with one patient at a time. Choose which.",
        "picker_scope": "The list shows only the patients you are responsible for.",
        "search_label": "Search by name",
        "search": "Search",
        "patients_legend": "Patients",
        "patient_label": "{name} (born {born})",
        "no_match": "None of your patients match “{query}”.",
        "show_all": "Show all patients",
        "choose": "Choose",
    },
}

_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")


def format_birth_date(value: str, lang: Lang) -> str:
    """A FHIR date (YYYY, YYYY-MM or YYYY-MM-DD) as people write it: "1. februar 1980" / "1 February
    1980"; anything else unchanged."""
    match = _DATE.match(value)
    if match is None:
        return value
    year, month, day = match.groups()
    if month is None or not 1 <= int(month) <= 12:
        return year if month is None else value
    name = MONTHS[lang][int(month) - 1]
    if day is None:
        return f"{name} {year}"
    if lang == "en":
        return f"{int(day)} {name} {year}"
    return f"{int(day)}. {name} {year}"


def signin_headers(redirect_uri: str | None = None) -> dict[str, str]:
    """The security headers of a sign-in page (those of :mod:`fhir_norse.web.pages`). For the consent
    page pass the app's ``redirect_uri``: its origin joins ``form-action``, because the browser applies
    ``form-action`` to the redirect that answers the form post, and that redirect goes to the app."""
    headers = dict(SECURITY_HEADERS)
    if redirect_uri:
        parts = urlsplit(redirect_uri)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            # A custom scheme (a native app's com.example.app:/callback) is allowed by its scheme.
            origin = (
                f"{parts.scheme}:"
                if parts.scheme and re.fullmatch(r"[a-z][a-z0-9+.-]*", parts.scheme)
                else ""
            )
        else:
            origin = f"{parts.scheme}://{parts.netloc}"
        if origin:
            headers["Content-Security-Policy"] = headers["Content-Security-Policy"].replace(
                "form-action 'self'", f"form-action 'self' {origin}"
            )
    return headers


@dataclass(frozen=True, slots=True)
class DevLoginView:
    """The development sign-in: who to be, among the people here with the login's identifier
    (``people``: reference, name, identifier value). Never offered outside development mode."""

    lang: Lang
    role: Role
    people: list[tuple[str, str, str]]
    action: str
    csrf: str
    request_id: str
    other_lang_url: str | None


_DEV_TEXTS: Mapping[str, Mapping[str, str]] = {
    "nb": {
        "title": "Innlogging for utvikling",
        "warning": (
            "Denne serveren kjører i utviklingsmodus uten nasjonal innlogging. Velg hvem du vil være. "
            "I produksjon logger pasienter inn med ID-porten og behandlere med HelseID."
        ),
        "legend_patient": "Pasienter",
        "legend_clinician": "Behandlere",
        "none": "Ingen her har et identifikasjonsnummer å logge inn med.",
        "sign_in": "Logg inn",
    },
    "en": {
        "title": "Development sign-in",
        "warning": (
            "This server runs in development mode without a national login. Choose who to be. In "
            "production, patients sign in with ID-porten and clinicians with HelseID."
        ),
        "legend_patient": "Patients",
        "legend_clinician": "Clinicians",
        "none": "Nobody here has an identifier to sign in with.",
        "sign_in": "Sign in",
    },
}


class SigninPages:
    """The template environment (built once, autoescaping everything) and the three pages."""

    def __init__(self) -> None:
        self.env = Environment(
            loader=FileSystemLoader(TEMPLATES),
            autoescape=select_autoescape(default=True, default_for_string=True),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )

    def _render(self, template: str, lang: Lang, other_lang_url: str | None, **values: object) -> str:
        lang = _lang(lang)
        texts = TEXTS[lang]
        return self.env.get_template(template).render(
            lang=lang, t=texts, other_lang_url=other_lang_url, stylesheets=STYLESHEETS, **values
        )

    def consent(self, view: ConsentView) -> str:
        texts = TEXTS[_lang(view.lang)]
        born = format_birth_date(view.patient_birth_date, view.lang) if view.patient_birth_date else None
        if view.role == "patient":
            asks, context = texts["asks_own"], texts["context_own"]
        elif view.patient_name:
            asks = texts["asks_patient"] + (texts["born"] if born else "")
            context = texts["context_patient"]
        else:
            asks, context = texts["asks_patients"], texts["context_patients"]
        asks = asks.format(app=view.app_name, patient=view.patient_name, born=born)
        if view.clinic:
            # "..., born 1 February 1980, at Klinikk Nord": the clinic is not the birthplace.
            asks += ("," if born and view.patient_name else "") + texts["at_clinic"].format(
                clinic=view.clinic
            )
        return self._render(
            "consent.html",
            view.lang,
            view.other_lang_url,
            view=view,
            title=texts["consent_title"].format(app=view.app_name),
            heading=texts["consent_heading"].format(app=view.app_name),
            asks=asks + ".",
            context=context,
        )

    def picker(self, view: PickerView) -> str:
        lang = _lang(view.lang)
        texts = TEXTS[lang]
        patients = [
            (
                patient_id,
                texts["patient_label"].format(name=name, born=format_birth_date(born, lang))
                if born
                else name,
            )
            for patient_id, name, born in view.patients
        ]
        empty = None if patients or view.query else refusal_text("no-patients", lang)
        return self._render(
            "picker.html",
            lang,
            view.other_lang_url,
            view=view,
            title=texts["picker_title"],
            patients=patients,
            empty=empty,
        )

    def refusal(self, view: RefusalView) -> str:
        return self._render("refusal.html", view.lang, view.other_lang_url, view=view, title=view.title)

    def dev_login(self, view: DevLoginView) -> str:
        dev = _DEV_TEXTS[_lang(view.lang)]
        return self._render(
            "dev_login.html",
            view.lang,
            view.other_lang_url,
            view=view,
            title=dev["title"],
            dev=dev,
            legend=dev["legend_clinician" if view.role == "clinician" else "legend_patient"],
        )
