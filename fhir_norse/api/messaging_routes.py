"""The SMS gateway's delivery reports: ``POST /messaging/twilio/status/{communication_id}``.

Twilio calls the ``StatusCallback`` URL given with each message as its status changes
(https://www.twilio.com/docs/messaging/guides/track-outbound-message-status), signed with the account's
auth token in ``X-Twilio-Signature`` (https://www.twilio.com/docs/usage/webhooks/webhooks-security) over
the public URL it called: ``settings.patient_origin()`` + the path, never the request's Host header. A
bad or missing signature is a 403; a good one updates the attempt's Communication
(:meth:`~fhir_norse.rom.invitations.Dispatcher.record_delivery`: delivered -> completed with the time
received, failed/undelivered -> not-done with the reason) and answers 204. Reports repeat: the same
report twice changes nothing the second time.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from fhir_norse.config import Settings
from fhir_norse.messaging.twilio import parse_status_callback, verify_twilio_signature
from fhir_norse.rom.invitations import Dispatcher
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.resources import ID_PATTERN

STATUS_PATH = "/messaging/twilio/status/{communication_id}"
# A status callback is a handful of short form fields.
MAX_FORM_BYTES = 16 * 1024


def install_messaging_routes(
    app: FastAPI, service: FhirService, settings: Settings, dispatcher: Dispatcher
) -> None:
    """Mount the Twilio status webhook on ``app``."""

    @app.post(STATUS_PATH, include_in_schema=False, response_model=None)
    async def twilio_status(request: Request, communication_id: str) -> Response:
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > MAX_FORM_BYTES:
                return PlainTextResponse("Too large", status_code=413)
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=64)
        except (UnicodeDecodeError, ValueError):
            return PlainTextResponse("Unreadable form", status_code=400)
        params = dict(pairs)
        url = settings.patient_origin() + request.url.path
        if request.url.query:
            url += "?" + request.url.query
        token = settings.twilio_auth_token.get_secret_value()
        signature = request.headers.get("x-twilio-signature", "")
        if not token or not verify_twilio_signature(url, params, signature, token):
            return PlainTextResponse("Forbidden", status_code=403)
        if not ID_PATTERN.match(communication_id):
            return PlainTextResponse("Not found", status_code=404)
        try:
            report = parse_status_callback(params)
        except ValueError as error:
            return PlainTextResponse(str(error), status_code=400)
        known = await run_in_threadpool(dispatcher.record_delivery, communication_id, report)
        if not known:
            return PlainTextResponse("Not found", status_code=404)
        return Response(status_code=204)
