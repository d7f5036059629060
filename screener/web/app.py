"""The Starlette application: health, metrics, the console pages and the JSON API.

Every path but ``/healthz``, ``/metrics``, ``/login`` and ``/static`` needs a user: pages
redirect to the login form, ``/api`` answers 401. Admin-only actions (retry deliveries, set
the threshold) answer 403 to viewers, carry a CSRF token, and call the same functions as the
CLI (``screener.delivery.retry_dead``, ``screener.thresholds.set_threshold``), audited.

Sign-ins (the form and HTTP Basic) are checked off the event loop, throttled and audited in
:mod:`screener.web.auth`. Form bodies are read up to FORM_MAX_BYTES, never more. Every answer
carries the headers of :class:`SecurityHeaders`.
"""

from __future__ import annotations

import io
import json
import re
import secrets
from collections.abc import Awaitable, Callable
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.datastructures import FormData, MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from screener.db.models import AuditLog
from screener.db.session import session_scope
from screener.settings import Settings
from screener.web import queries
from screener.web.auth import COOKIE, Auth, Principal, Refused, client_address
from screener.web.health import health
from screener.web.thread_lane import ThreadLane

HERE = Path(__file__).resolve().parent
LOGIN_CSRF_COOKIE = "screener_login_csrf"
STATES = ("in_progress", "delivered", "completed", "ignored", "failed", "receiving")
Endpoint = Callable[[Request], Awaitable[Response]]
# Console handlers are plain functions: they read the database, so they run on the
# console's threads (screener.web.thread_lane), never on the event loop.
UserHandler = Callable[[Request, Principal], Response]
FormHandler = Callable[[Request, Principal, FormData], Response]

# The console's forms are small (the largest: 500 retry checkboxes, ~6 KB). A body is read
# up to this many bytes and refused (413) beyond, declared or not, before it is parsed.
FORM_MAX_BYTES = 16 * 1024
FORM_MAX_FIELDS = 600
# database ids are 32-bit integers (PostgreSQL INTEGER): larger ones are no id at all
DB_ID_MAX = 2**31 - 1
_ID = re.compile(r"[0-9]{1,18}")

# What the console says after a redirect: the query string names a code, never the text
# (a link with ?message=... must not make the console say what its author wants).
DELIVERY_MESSAGES = {"nothing-selected": "nothing selected", "re-queued": "re-queued {n}"}
THRESHOLD_ERRORS = {
    "value": "Not changed: the threshold must be a number in [0, 1].",
    "reason": "Not changed: a reason is required for every threshold change.",
    "invalid": "Not changed: the threshold was refused.",
}

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}
HSTS = "max-age=31536000"


class SecurityHeaders:
    """Headers on every answer: no framing by other sites (clickjacking), nothing loaded or
    run from elsewhere, no MIME sniffing, no URL (study UIDs) in the Referer of outside
    links, no caching of anything but /static (pages and the API carry patient data), and
    HSTS when the service speaks TLS itself or its proxy says it does (X-Forwarded-Proto,
    trusted from the addresses uvicorn's forwarded_allow_ips names)."""

    def __init__(self, app: ASGIApp, *, tls: bool) -> None:
        self.app = app
        self.tls = tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        https = self.tls or scope.get("scheme") == "https"
        static = str(scope.get("path", "")).startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if not static:
                    headers["cache-control"] = "no-store"
                if https:
                    headers["strict-transport-security"] = HSTS
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _date(text: str | None) -> date | None:
    try:
        return date.fromisoformat(text) if text else None
    except ValueError:
        return None


async def read_form(request: Request) -> FormData | Response:
    """The request's form, or the answer refusing it: 413 past FORM_MAX_BYTES (whether the
    client declared a Content-Length or sent chunks), 400 when malformed. Nothing beyond
    the limit is read, and no file part is accepted (none is spooled to disk)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not _ID.fullmatch(declared.strip()):
            return PlainTextResponse("refused: bad Content-Length", status_code=400)
        if int(declared) > FORM_MAX_BYTES:
            return PlainTextResponse("refused: form too large", status_code=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_MAX_BYTES:
            return PlainTextResponse("refused: form too large", status_code=413)
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:  # nothing more: the form parser never asks again
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": bytes(body), "more_body": False}

    # starlette answers 400 itself (HTTPException) when the parser refuses the body
    return await Request(request.scope, replay).form(
        max_files=0, max_fields=FORM_MAX_FIELDS, max_part_size=FORM_MAX_BYTES
    )


def _safe_next(target: str) -> str:
    return target if target.startswith("/") and not target.startswith("//") else "/studies"


def create_app(settings: Settings, listener_alive: Callable[[], bool] | None = None) -> Starlette:
    """The HTTP service for ``settings``; ``listener_alive`` when it runs inside ``serve``."""
    auth = Auth(settings)
    console = ThreadLane("console")
    templates = Jinja2Templates(directory=str(HERE / "templates"))

    def secure(request: Request) -> bool:
        """Cookies get the Secure flag over HTTPS: served by us, or by the TLS proxy in
        front (uvicorn set the scheme from its X-Forwarded-Proto)."""
        return settings.http.tls or request.url.scheme == "https"

    def page(
        request: Request, name: str, who: Principal, status: int = 200, **context: Any
    ) -> Response:
        context.update(user=who.user, is_admin=who.is_admin, csrf=who.csrf)
        context.setdefault("disclaimer", settings.disclaimer)
        return templates.TemplateResponse(request, name, context, status_code=status)

    async def page_user(request: Request) -> Principal | Response:
        who = await console.run(auth.from_cookie, request.cookies.get(COOKIE))
        if who is None:
            target = quote(
                request.url.path + (f"?{request.url.query}" if request.url.query else "")
            )
            return RedirectResponse(f"/login?next={target}", status_code=303)
        return who

    async def api_user(request: Request) -> Principal | Response:
        """HTTP Basic when the request carries it (a wrong password is a 401 even beside a
        session cookie), else the session cookie."""
        who: Principal | None
        if request.headers.get("authorization", "").lower().startswith("basic "):
            basic = await auth.from_basic(request)
            if isinstance(basic, Refused):
                return JSONResponse(
                    {"error": basic.reason},
                    status_code=basic.status,
                    headers={"Retry-After": str(basic.retry_after)},
                )
            who = basic
        else:
            who = await console.run(auth.from_cookie, request.cookies.get(COOKIE))
        if who is None:
            return JSONResponse(
                {"error": "authentication required"},
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="pacs-screener"'},
            )
        return who

    def for_page(handler: UserHandler) -> Endpoint:
        """A page handler behind the login form."""

        async def endpoint(request: Request) -> Response:
            who = await page_user(request)
            return who if isinstance(who, Response) else await console.run(handler, request, who)

        return endpoint

    def for_api(handler: UserHandler) -> Endpoint:
        """An API handler behind HTTP Basic or the session cookie."""

        async def endpoint(request: Request) -> Response:
            who = await api_user(request)
            return who if isinstance(who, Response) else await console.run(handler, request, who)

        return endpoint

    def form_post(*, admin: bool) -> Callable[[FormHandler], Endpoint]:
        """A form POST behind the login form and a valid CSRF token; with ``admin``, admins only."""

        def wrap(handler: FormHandler) -> Endpoint:
            async def endpoint(request: Request) -> Response:
                who = await page_user(request)
                if isinstance(who, Response):
                    return who
                form = await read_form(request)
                if isinstance(form, Response):
                    return form
                if not auth.csrf_ok(who, str(form.get("csrf_token", ""))):
                    return PlainTextResponse(
                        "refused: missing or wrong CSRF token", status_code=403
                    )
                if admin and not who.is_admin:
                    reason = "only admins may do this"
                    return page(request, "refused.html", who, status=403, reason=reason)
                return await console.run(handler, request, who, form)

            return endpoint

        return wrap

    def web_audit(who: Principal, action: str, detail: dict[str, Any]) -> None:
        with session_scope(settings.database_url) as session:
            session.add(AuditLog(actor=f"web:{who.user.name}"[:64], action=action, detail=detail))

    # ------------------------------------------------------------------ open endpoints

    # Plain functions: Starlette runs them on its thread pool. Both block on the database
    # (and /healthz on the broker); on the event loop a peer that never answers held
    # every request of the service, the console's too.

    def healthz(request: Request) -> Response:
        report = health(settings, listener_alive)  # answers within health.DEADLINE_S
        return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)

    def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        from screener.metrics import exposition

        return Response(exposition(settings), media_type=CONTENT_TYPE_LATEST)

    def login_page(
        request: Request, token: str, nxt: str, refused: Refused | None = None
    ) -> Response:
        """The login form (with ``refused``: why this sign-in was not checked, and when to
        try again, with its status and Retry-After)."""
        response = templates.TemplateResponse(
            request,
            "login.html",
            {
                "csrf": token,
                "next": nxt,
                "error": request.query_params.get("error") == "1",
                "refused": refused,
                "user": None,
                "disclaimer": settings.disclaimer,
            },
            status_code=refused.status if refused else 200,
            headers={"Retry-After": str(refused.retry_after)} if refused else None,
        )
        response.set_cookie(
            LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=secure(request)
        )
        return response

    async def login_form(request: Request) -> Response:
        # keep an existing token: a second tab (or a favicon fetch) must not void the first form
        token = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(24)
        return login_page(request, token, request.query_params.get("next", "/studies"))

    async def login(request: Request) -> Response:
        expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not expected:  # refused before a byte of the body is read
            return PlainTextResponse("refused: missing or wrong CSRF token", status_code=403)
        form = await read_form(request)
        if isinstance(form, Response):
            return form
        sent = str(form.get("csrf_token", ""))
        if not secrets.compare_digest(sent, expected):
            return PlainTextResponse("refused: missing or wrong CSRF token", status_code=403)
        nxt = _safe_next(str(form.get("next", "/studies")))  # never an open redirect
        user = await auth.check_password(
            str(form.get("username", "")),
            str(form.get("password", "")),
            client_address(request),
            "form",
        )
        if isinstance(user, Refused):
            return login_page(request, expected, nxt, refused=user)
        if user is None:
            return RedirectResponse(f"/login?error=1&next={quote(nxt)}", status_code=303)
        cookie, _csrf = await console.run(auth.issue, user)
        response = RedirectResponse(nxt, status_code=303)
        # no Max-Age: the cookie ends with the browser session; the server ends the session
        # after http.session_idle_minutes idle or http.session_hours, whichever comes first
        response.set_cookie(COOKIE, cookie, httponly=True, samesite="lax", secure=secure(request))
        response.delete_cookie(
            LOGIN_CSRF_COOKIE, httponly=True, samesite="strict", secure=secure(request)
        )
        return response

    @form_post(admin=False)
    def logout(request: Request, who: Principal, form: FormData) -> Response:
        auth.end(who)  # every copy of the cookie stops working
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, httponly=True, samesite="lax", secure=secure(request))
        return response

    # ------------------------------------------------------------------ pages

    def study_filters(request: Request) -> dict[str, Any]:
        q = request.query_params
        return {
            "state": q.get("state") or None,
            "day_from": _date(q.get("from")),
            "day_to": _date(q.get("to")),
            "call": q.get("call") if q.get("call") in ("positive", "negative") else None,
            "accession": q.get("accession") or None,
        }

    @for_page
    def home(request: Request, who: Principal) -> Response:
        return RedirectResponse("/studies", 303)

    @for_page
    def studies_page(request: Request, who: Principal) -> Response:
        rows = queries.list_studies(settings, limit=200, **study_filters(request))
        return page(request, "studies.html", who, rows=rows, q=request.query_params, states=STATES)

    @for_page
    def study_page(request: Request, who: Principal) -> Response:
        detail = queries.study_detail(settings, request.path_params["uid"])
        if detail is None:
            return PlainTextResponse("no such study", status_code=404)
        return page(request, "study.html", who, d=detail)

    @for_page
    def heatmap_png(request: Request, who: Principal) -> Response:
        path = queries.output_file(settings, request.path_params["uid"], request.path_params["sop"])
        if path is None:
            return PlainTextResponse("no such output file", status_code=404)
        return Response(render_png(path), media_type="image/png")

    def delivery_message(request: Request) -> str | None:
        text = DELIVERY_MESSAGES.get(request.query_params.get("message", ""))
        count = request.query_params.get("n", "")
        if text is None or ("{n}" in text and not re.fullmatch(r"[0-9]{1,6}", count)):
            return None
        return text.format(n=int(count)) if "{n}" in text else text

    @for_page
    def deliveries_page(request: Request, who: Principal) -> Response:
        from screener.delivery import destination_health, list_deliveries

        state = request.query_params.get("state") or None
        rows = list_deliveries(settings, [state] if state else None, limit=500)
        return page(
            request,
            "deliveries.html",
            who,
            rows=rows,
            state=state,
            destinations=destination_health(settings),
            message=delivery_message(request),
        )

    @form_post(admin=True)
    def retry_deliveries(request: Request, who: Principal, form: FormData) -> Response:
        from screener.delivery import retry_dead

        values = [str(v) for v in form.getlist("id")]
        if any(not _ID.fullmatch(v) or int(v) > DB_ID_MAX for v in values):
            return PlainTextResponse("refused: not a delivery id", status_code=400)
        ids = [int(v) for v in values]
        if not ids:  # retry_dead(None) means every dead letter: never from an empty form
            return RedirectResponse("/deliveries?message=nothing-selected", status_code=303)
        count = retry_dead(settings, ids)
        web_audit(who, "web.delivery.retry", {"ids": ids, "requeued": count})
        return RedirectResponse(f"/deliveries?message=re-queued&n={count}", status_code=303)

    @for_page
    def thresholds_page(request: Request, who: Principal) -> Response:
        from screener.thresholds import active_record, history

        return page(
            request,
            "thresholds.html",
            who,
            active=active_record(settings),
            history=history(settings),
            error=THRESHOLD_ERRORS.get(request.query_params.get("error", "")),
        )

    @form_post(admin=True)
    def set_threshold_form(request: Request, who: Principal, form: FormData) -> Response:
        from screener.thresholds import set_threshold

        reason = str(form.get("reason", ""))
        try:
            value = float(str(form.get("value", "")))
        except ValueError:
            value = float("nan")
        if not 0.0 <= value <= 1.0:  # NaN too
            return RedirectResponse("/thresholds?error=value", status_code=303)
        if not reason.strip():
            return RedirectResponse("/thresholds?error=reason", status_code=303)
        try:
            set_threshold(settings, value, reason=reason, set_by=f"web:{who.user.name}")
        except ValueError:
            return RedirectResponse("/thresholds?error=invalid", status_code=303)
        return RedirectResponse("/thresholds", status_code=303)

    @for_page
    def model_page(request: Request, who: Principal) -> Response:
        card, metrics_data = queries.model_card(settings)
        from screener.metrics import model_labels

        return page(
            request,
            "model.html",
            who,
            card=card,
            metrics=json.dumps(metrics_data, indent=1)[:20000],
            labels=model_labels(settings),
        )

    @for_page
    def monitoring_page(request: Request, who: Principal) -> Response:
        return page(request, "monitoring.html", who, m=queries.monitoring(settings))

    @for_page
    def audit_page(request: Request, who: Principal) -> Response:
        return page(request, "audit.html", who, rows=queries.audit_log(settings))

    # ------------------------------------------------------------------ JSON API

    @for_api
    def api_studies(request: Request, who: Principal) -> Response:
        try:
            limit = max(1, min(1000, int(request.query_params.get("limit", "100"))))
        except ValueError:
            return JSONResponse({"error": "limit must be an integer"}, status_code=400)
        rows = queries.list_studies(settings, limit=limit, **study_filters(request))
        return JSONResponse([r.to_json() for r in rows])

    @for_api
    def api_study(request: Request, who: Principal) -> Response:
        d = queries.study_detail(settings, request.path_params["uid"])
        if d is None:
            return JSONResponse({"error": "no such study"}, status_code=404)
        return JSONResponse(
            {
                **d.row.to_json(),
                "images": d.images,
                "outputs": d.outputs,
                "timeline": d.timeline,
            }
        )

    @for_api
    def api_deliveries(request: Request, who: Principal) -> Response:
        from screener.delivery import list_deliveries

        state = request.query_params.get("state")
        rows = list_deliveries(settings, [state] if state else None, limit=1000)
        return JSONResponse([r.to_json() for r in rows])

    @for_api
    def api_me(request: Request, who: Principal) -> Response:
        return JSONResponse(who.user.to_json())

    async def not_found(request: Request, exc: Exception) -> Response:
        """Unknown paths need a login too (no probing without one)."""
        if request.url.path.startswith("/api/"):
            who = await api_user(request)
            if isinstance(who, Response):
                return who
            return JSONResponse({"error": "not found"}, status_code=404)
        who = await page_user(request)
        if isinstance(who, Response):
            return who
        return PlainTextResponse("not found", status_code=404)

    routes = [
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", home),
        Route("/studies", studies_page),
        Route("/studies/{uid}", study_page),
        Route("/studies/{uid}/outputs/{sop}.png", heatmap_png),
        Route("/deliveries", deliveries_page, methods=["GET"]),
        Route("/deliveries/retry", retry_deliveries, methods=["POST"]),
        Route("/thresholds", thresholds_page, methods=["GET"]),
        Route("/thresholds", set_threshold_form, methods=["POST"]),
        Route("/model", model_page),
        Route("/monitoring", monitoring_page),
        Route("/audit", audit_page),
        Route("/api/studies", api_studies),
        Route("/api/studies/{uid}", api_study),
        Route("/api/deliveries", api_deliveries),
        Route("/api/me", api_me),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={404: not_found},
        middleware=[Middleware(SecurityHeaders, tls=settings.http.tls)],
    )
    app.state.auth = auth  # for tests and operators' introspection
    return app


def render_png(path: Path, max_size: int = 1024) -> bytes:
    """A DICOM secondary capture (RGB or greyscale) as a PNG for the browser."""
    import numpy as np
    from PIL import Image
    from pydicom import dcmread

    ds = dcmread(path)
    pixels = ds.pixel_array
    if pixels.dtype != np.uint8:
        lo, hi = float(pixels.min()), float(pixels.max())
        pixels = ((pixels - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    image.thumbnail((max_size, max_size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
