"""Forms the server derives and publishes under a canonical of their own: the tailored static form.

A form filler (LHC-Forms, any SDC filler) fetches the Questionnaire a response names by its canonical
(``Questionnaire?url=``) and submits the response with ``questionnaire`` = that ``url|version``, so a
derived form must be a stored Questionnaire, not only the body of an operation's answer. Its canonical
is computed from its content (:func:`fhir_norse.adaptive.forms.tailored_form`), so it is stored once,
the first time some patient's plan asks exactly these items, and read back ever after. It carries the
``published`` tag: like the content pack it is the server's and read-only over the API. Intake scores a
response to it with the mapping of the form it derives from (:class:`fhir_norse.rom.intake
.QuestionnaireResponseIntake`).
"""

from __future__ import annotations

from fhir_norse.outcomes import FhirError
from fhir_norse.server.content import stored_id
from fhir_norse.server.published import PUBLISHED_TAG
from fhir_norse.server.repository import Derived, JsonDict, Repository, loads
from fhir_norse.server.search.typed import Where


def publish_form(repo: Repository, form: JsonDict) -> JsonDict:
    """The stored Questionnaire of ``form`` (its ``url|version``), stored now when it is not yet.

    Runs as the server in the caller's transaction; concurrent callers of one canonical are serialised,
    as every write of a canonical is (:mod:`fhir_norse.server.published`)."""
    server = repo.as_server()
    url, version = str(form["url"]), str(form["version"])
    server.serialize(f"canonical:Questionnaire|{url}")
    where = Where("Questionnaire", uris={"url": url}, tokens={"version": version})
    found = server.find(where, 2)
    if not found:
        body = {**form, "id": stored_id(form), "meta": {"tag": [PUBLISHED_TAG]}}
        server.save_derived([Derived("Questionnaire", body["id"], body)])
        found = server.find(where, 2)
    stored = loads(found[0].body_text)
    if {k: v for k, v in stored.items() if k not in ("id", "meta")} != form:
        # The canonical is a digest of the content: this would take a collision of SHA-256 prefixes.
        raise FhirError(f"Questionnaire {url}|{version} is stored with other content")
    return stored
