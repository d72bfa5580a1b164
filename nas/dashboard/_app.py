"""The dashboard's web app: FastAPI routes over a :class:`~nas.store.Store`, Jinja2 pages and JSON
endpoints the pages poll.

Security model:

- With a token (always when bound to a non-loopback address) every request must carry it: a
  ``?token=`` in a URL once (answered by a redirect that drops it and sets an HttpOnly,
  SameSite=Strict cookie), the cookie, or ``Authorization: Bearer TOKEN``; compared in constant time.
- Without a token the app answers only requests whose Host header names a loopback address (this
  defeats DNS rebinding: a foreign web page cannot read the pages, so it cannot read the CSRF token).
- Every state-changing request is a POST carrying the app's CSRF token (``X-CSRF-Token`` header or a
  ``csrf_token`` form field, constant-time compare), from the same origin when the browser says so.
  GET never changes anything.
- Downloads are files this app wrote, served from the export directory only: a whitelisted name
  pattern, no path separators, resolved inside the directory, never a symlink, and the very file
  (device, inode, size, mtime) this process wrote there with a single link; anything else is a 404.
- Tokens are at least 16 characters; a client address that sends 10 wrong tokens within a minute
  is locked out (429) for 30 s, doubling with each further lockout.
- Request bodies are counted while they are read and refused (413) past 64 KiB, chunked or not.
- Every answer, errors included, carries the security headers (CSP, nosniff, no framing, no referrer).
- Study names and architecture hashes in URLs are validated; store content reaches HTML only through
  Jinja2 autoescaping, and JavaScript only as JSON (``|tojson``, or fetched) inserted with textContent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import secrets
import stat
import threading
import time
import zipfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import jinja2
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nas import lifecycle
from nas.export import study_has_weights
from nas.search import SearchError
from nas.store import Store, StoreError, StudyInfo, mask_url, validate_study_name

from ._data import HEX64, architecture_view, study_detail, study_summary
from ._runner import Launcher, LaunchError

PKG = Path(__file__).resolve().parent
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
EXPORT_NAME = re.compile(r"^model_[A-Za-z0-9_]{1,100}_[0-9a-f]{12}\.(py|safetensors|zip)$")
_MEDIA = {".py": "text/x-python", ".safetensors": "application/octet-stream", ".zip": "application/zip"}
_MAX_BODY = 64 * 1024
MIN_TOKEN = 16  # characters: shorter tokens are refused
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
        "connect-src 'self'; font-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'")
_SECURITY_HEADERS = (("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"),
                     ("Referrer-Policy", "no-referrer"), ("Content-Security-Policy", _CSP),
                     ("Cache-Control", "no-store"))


class DashboardError(ValueError):
    """A dashboard that cannot start as asked (one line: what was wrong and what to do)."""


def default_export_dir(url: str) -> Path:
    """``nas_exports/`` beside a SQLite store (as its studies' ``nas_runs/``), else in the working directory."""
    base = Path(".")
    if url.startswith("sqlite:///"):
        base = Path(url[len("sqlite:///"):]).expanduser().resolve().parent
    return (base / "nas_exports").resolve()


def absolute_url(url: str) -> str:
    """A SQLite URL with an absolute file path (resumes run in another working directory)."""
    if url.startswith("sqlite:///"):
        return "sqlite:///" + str(Path(url[len("sqlite:///"):]).expanduser().resolve())
    return url


def export_stem(study: str, arch_hash: str) -> str:
    """The file stem of an export: an importable module name, unique per (study, architecture)."""
    safe = re.sub(r"[^A-Za-z0-9_]", "_", study)
    if safe != study:  # a-b and a_b must not share files
        safe += "_" + hashlib.sha256(study.encode()).hexdigest()[:4]
    return f"model_{safe}_{arch_hash[:12]}"


def _host_name(host_header: str) -> str:
    """The host of a Host header, without the port (``[::1]:80`` -> ``::1``)."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") or "application/json" in request.headers.get("accept", "")


def check_token(token: str | None) -> None:
    """Refuse an empty or short token (DashboardError, one line)."""
    if token is None:
        return
    if not token.strip():
        raise DashboardError("the dashboard token is empty: give a non-empty --token or leave it out")
    if len(token) < MIN_TOKEN:
        raise DashboardError(f"the dashboard token is too short ({len(token)} characters): use at least {MIN_TOKEN}, "
                             "or leave --token out and one is generated")


def check_export_dir(path: Path) -> Path:
    """The export directory, resolved, without creating it: a directory, or a path whose nearest
    existing parent is a writable directory (DashboardError otherwise). It is created only when
    the first export is written, so a dashboard that fails to start writes nothing."""
    resolved = path.expanduser().resolve()
    if resolved.exists():
        if not resolved.is_dir():
            raise DashboardError(f"the export directory {resolved} is not a directory: give another --export-dir")
        if not os.access(resolved, os.W_OK | os.X_OK):
            raise DashboardError(f"the export directory {resolved} is not writable: give another --export-dir")
        return resolved
    parent = resolved.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise DashboardError(f"cannot create the export directory {resolved} ({parent} is not a writable "
                             "directory): give another --export-dir")
    return resolved


class Guesses:
    """Wrong tokens per client address: ``LIMIT`` of them within ``WINDOW`` seconds lock the address
    out (429) for ``LOCK`` seconds, doubling with each further lockout (at most ``MAX_LOCK``)."""

    LIMIT, WINDOW, LOCK, MAX_LOCK, MAX_CLIENTS = 10, 60.0, 30.0, 3600.0, 10_000

    def __init__(self) -> None:
        self._fails: dict[str, list[float]] = {}
        self._until: dict[str, float] = {}
        self._lockouts: dict[str, int] = {}
        self._lock = threading.Lock()

    def locked(self, client: str, now: float) -> float:
        """Seconds left of ``client``'s lockout (0 when none)."""
        with self._lock:
            return max(0.0, self._until.get(client, 0.0) - now)

    def fail(self, client: str, now: float) -> None:
        with self._lock:
            if len(self._fails) + len(self._until) > self.MAX_CLIENTS:  # bounded memory: forget quiet clients
                for c in [c for c, ts in self._fails.items() if not ts or now - ts[-1] > self.WINDOW]:
                    self._fails.pop(c, None)
                for c in [c for c, t in self._until.items() if t < now - self.MAX_LOCK]:
                    self._until.pop(c, None)
                    self._lockouts.pop(c, None)
            recent = [t for t in self._fails.get(client, []) if now - t < self.WINDOW] + [now]
            if len(recent) >= self.LIMIT:
                n = self._lockouts.get(client, 0)
                self._until[client] = now + min(self.MAX_LOCK, self.LOCK * 2 ** n)
                self._lockouts[client] = n + 1
                recent = []
            self._fails[client] = recent


class Dashboard:
    """The app's state: the store, its secrets, the export directory and the resume launcher."""

    def __init__(self, url: str, *, token: str | None, export_dir: Path, log_dir: Path | None,
                 allowed_hosts: set[str] | None) -> None:
        try:
            self.store = Store(absolute_url(url))
        except StoreError as e:
            raise DashboardError(str(e)) from None
        self.url = self.store.url
        self.token = token
        self.cookie = None if token is None else "nas_dashboard_" + hashlib.sha256(token.encode()).hexdigest()[:10]
        self.csrf = secrets.token_urlsafe(32)
        self.export_dir = check_export_dir(export_dir)
        self.launcher = Launcher(self.url, log_dir)
        self.allowed_hosts = allowed_hosts
        self.export_lock = threading.Lock()
        self.written: dict[str, tuple[int, int, int, int]] = {}  # export name -> (dev, inode, size, mtime_ns)
        self.guesses = Guesses()
        self.clock: Callable[[], float] = time.monotonic
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(PKG / "templates")), autoescape=True,
                                      undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)

    # ---- checks -------------------------------------------------------------------------

    def authorized(self, request: Request) -> bool:
        if self.token is None:
            return True
        auth = request.headers.get("authorization", "")
        candidates = [auth[7:].strip()] if auth.lower().startswith("bearer ") else []
        if self.cookie and self.cookie in request.cookies:
            candidates.append(request.cookies[self.cookie])
        return any(hmac.compare_digest(c.encode(), self.token.encode()) for c in candidates)

    def token_ok(self, supplied: str) -> bool:
        return self.token is not None and hmac.compare_digest(supplied.encode(), self.token.encode())

    def offers_token(self, request: Request) -> bool:
        """Whether the request carries a token to check (a guess, when it is wrong)."""
        return ("token" in request.query_params or request.headers.get("authorization", "").lower()
                .startswith("bearer ") or bool(self.cookie and self.cookie in request.cookies))

    # ---- exports ------------------------------------------------------------------------

    def make_export_dir(self) -> None:
        """Create the export directory (at the first export); it must still resolve to itself."""
        try:
            self.export_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HTTPException(500, f"cannot create the export directory {self.export_dir}: {e.strerror or e}") \
                from None
        if self.export_dir.resolve() != self.export_dir or self.export_dir.is_symlink():
            raise HTTPException(500, f"the export directory {self.export_dir} was replaced by a link")

    def remember(self, path: Path) -> None:
        """Note a file this process just wrote in the export directory: only such files are served."""
        st = os.lstat(path)
        self.written[path.name] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def open_export(self, name: str) -> tuple[int, os.stat_result] | None:
        """An open descriptor on export ``name`` and its stat, if it is exactly the file this process
        wrote there (same device, inode, size and mtime; a regular file with one link; no symlink)."""
        ident = self.written.get(name)
        if ident is None or not EXPORT_NAME.match(name):
            return None
        try:
            fd = os.open(self.export_dir / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or \
                (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != ident:
            os.close(fd)
            return None
        return fd, st

    def exported_files(self, stem: str) -> list[str]:
        """The downloadable files of an export stem (written by this process, unchanged)."""
        out = []
        for name in sorted(n for n in self.written if n.startswith(stem + ".")):
            opened = self.open_export(name)
            if opened is not None:
                os.close(opened[0])
                out.append(name)
        return out

    def study(self, name: str) -> StudyInfo:
        """The study named in a URL: 400 for a name that cannot be a study's, 404 for an unknown one."""
        try:
            validate_study_name(name)
        except StoreError as e:
            raise HTTPException(400, str(e)) from None
        info = self.store.get_study(name)
        if info is None:
            raise HTTPException(404, f"no study {name!r} in this store")
        return info

    def architecture(self, info: StudyInfo, arch_hash: str) -> dict[str, Any]:
        """An architecture the study evaluated: 404 for a malformed or foreign hash."""
        if not HEX64.match(arch_hash):
            raise HTTPException(404, "an architecture hash is 64 lowercase hex digits")
        arch = self.store.architecture(arch_hash)
        if arch is None or not self.store.evaluations(info.name, arch_hash=arch_hash):
            raise HTTPException(404, f"study {info.name!r} has no architecture {arch_hash[:12]}")
        return arch

    # ---- rendering ----------------------------------------------------------------------

    def page(self, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("csrf_token", self.csrf)
        context.setdefault("storage", mask_url(self.url))
        html = self.env.get_template(name).render(**context)
        return HTMLResponse(html, status_code=status)

    def answer(self, request: Request, message: str, back: str, status: int = 200, **extra: Any) -> Response:
        """A POST's answer: JSON for the page's script, else a redirect back (or the error page)."""
        if _wants_json(request):
            return JSONResponse({"ok": status < 400, "message": message, **extra}, status_code=status)
        if status < 400:
            return RedirectResponse(extra.get("url") or back, status_code=303)
        return self.page("error.html", status=status, status_code=status, message=message, back=back)


class BodyTooLarge(StarletteHTTPException):
    """A request body past the limit (raised while it is read)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body too large (at most {limit // 1024} KiB)")


class BodyLimit:
    """ASGI middleware: refuse (413) a request whose body passes ``limit`` bytes, as it is read.

    A Content-Length over the limit is refused before any of the body is read; otherwise every
    chunk the app receives is counted (chunked bodies, absent or lying lengths) and the read
    that passes the limit raises :class:`BodyTooLarge`, answered 413 at once."""

    def __init__(self, app: ASGIApp, limit: int = _MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = self.limit + 1
                if declared > self.limit:
                    await self._refuse(send)
                    return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": BodyTooLarge(self.limit).detail}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    """ASGI middleware: the security headers on every response, errors included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in _SECURITY_HEADERS:
                    headers.setdefault(k, v)
            await send(message)

        await self.app(scope, receive, with_headers)


async def _read_form(request: Request) -> dict[str, str]:
    """The POST body's fields (urlencoded or JSON), at most 64 KiB (counted as it is read)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > _MAX_BODY:
            raise BodyTooLarge(_MAX_BODY)
        chunks.append(chunk)
    body = b"".join(chunks)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not body:
        return {}
    if ctype == "application/json":
        try:
            data = json.loads(body)
        except ValueError:
            raise HTTPException(400, "request body is not JSON") from None
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    if ctype == "application/x-www-form-urlencoded":
        return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
    return {}


def create_app(storage_url: str, *, token: str | None = None, export_dir: str | os.PathLike[str] | None = None,
               log_dir: str | os.PathLike[str] | None = None, allowed_hosts: set[str] | None = None,
               poll_ms: int = 1500) -> FastAPI:
    """The dashboard over the store at ``storage_url``.

    ``token``: required on every request when given (a non-loopback bind must give one; see
    :func:`check_bind`). ``export_dir``: where exports are written and the only place downloads are
    served from (default: ``nas_exports/`` beside a SQLite store). ``log_dir``: where resumes started
    here log (default: the study's work directory). ``allowed_hosts``: Host header names accepted
    (default: the loopback names without a token, any with one). ``poll_ms``: how often pages refresh."""
    check_token(token)
    exports = Path(export_dir) if export_dir is not None else default_export_dir(absolute_url(storage_url))
    hosts = allowed_hosts if allowed_hosts is not None else (None if token else set(LOOPBACK_HOSTS))
    dash = Dashboard(storage_url, token=token, export_dir=exports, log_dir=None if log_dir is None else Path(log_dir),
                     allowed_hosts=None if hosts is None else {h.lower() for h in hosts})
    app = FastAPI(title="hybrid-NAS dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.dashboard = dash
    # innermost (added first): its 413 is raised in the endpoint's own reads, where the exception
    # handlers answer it, not inside the guard's task group
    app.add_middleware(BodyLimit, limit=_MAX_BODY)
    app.add_middleware(GZipMiddleware, minimum_size=2048)

    def locked_out(request: Request, wait: float) -> Response:
        msg = f"too many wrong tokens from this address: try again in {math.ceil(wait)} s"
        headers = {"Retry-After": str(math.ceil(wait))}
        if _wants_json(request):
            return _secure(JSONResponse({"detail": msg}, status_code=429, headers=headers))
        resp = dash.page("error.html", status=429, status_code=429, message=msg, back=None, csrf_token="", storage="")
        resp.headers.update(headers)
        return _secure(resp)

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if dash.allowed_hosts is not None and _host_name(request.headers.get("host", "")) not in dash.allowed_hosts:
            return _secure(Response("this dashboard answers only on a loopback address (open http://127.0.0.1:PORT/)\n",
                                    status_code=400, media_type="text/plain"))
        if request.url.path != "/healthz" and dash.token is not None:
            client = request.client.host if request.client else "?"
            guessing = dash.offers_token(request)
            if guessing:
                wait = dash.guesses.locked(client, dash.clock())
                if wait > 0:
                    return locked_out(request, wait)
            supplied = request.query_params.get("token")
            if supplied is not None and dash.token_ok(supplied):
                rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
                target = request.url.path + ("?" + urlencode(rest) if rest else "")
                resp = RedirectResponse(target, status_code=303)
                resp.set_cookie(dash.cookie or "", dash.token, httponly=True, samesite="strict", path="/",
                                secure=request.url.scheme == "https")
                return _secure(resp)
            ok = dash.authorized(request)
            if supplied is not None or (guessing and not ok):  # a wrong ?token=, or a wrong bearer or cookie
                dash.guesses.fail(client, dash.clock())
                wait = dash.guesses.locked(client, dash.clock())
                if wait > 0:
                    return locked_out(request, wait)
            if not ok:
                msg = ("this dashboard needs its token: open the URL `nas dashboard` printed (…/?token=TOKEN) "
                       "or send 'Authorization: Bearer TOKEN'")
                if _wants_json(request):
                    return _secure(JSONResponse({"detail": msg}, status_code=401))
                return _secure(dash.page("error.html", status=401, status_code=401, message=msg, back=None,
                                         csrf_token="", storage=""))  # nothing about the store before the token
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("origin")
            fetch_site = request.headers.get("sec-fetch-site", "").lower()
            # an opaque origin ("null": sandboxed frames, file: pages, some redirects) is never ours
            if (origin is not None and (origin.strip().lower() == "null" or
                                        origin.rstrip("/").split("://", 1)[-1].lower()
                                        != request.headers.get("host", "").lower())) \
                    or fetch_site in ("cross-site", "same-site"):
                return _secure(JSONResponse({"detail": "cross-origin request refused"}, status_code=403))
        return _secure(await call_next(request))

    async def csrf_form(request: Request) -> dict[str, str]:
        """The POST's fields, after checking its CSRF token (403 without the right one)."""
        form = await _read_form(request)
        supplied = request.headers.get("x-csrf-token") or form.get("csrf_token") or ""
        if not hmac.compare_digest(supplied.encode(), dash.csrf.encode()):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
        return form

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if _wants_json(request) or request.url.path.startswith(("/static/", "/exports/")):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return dash.page("error.html", status=exc.status_code, status_code=exc.status_code,
                         message=str(exc.detail), back="/")

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Response:
        """A bug or a store that went away: a short 500 with the security headers, no traceback."""
        msg = f"internal error ({type(exc).__name__}); the dashboard's log has the details"
        if _wants_json(request):
            return _secure(JSONResponse({"detail": msg}, status_code=500))
        return _secure(HTMLResponse(f"<!doctype html><title>500</title><p>{msg}</p>", status_code=500))

    # ---- pages --------------------------------------------------------------------------

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> Response:
        return Response("ok\n", media_type="text/plain")

    @app.get("/", response_class=HTMLResponse)
    def studies_page() -> Response:
        rows = [study_summary(dash.store, s, dash.launcher.get(s.name)) for s in dash.store.studies()]
        return dash.page("studies.html", studies=rows, initial={"studies": rows, "poll_ms": poll_ms},
                         optuna=f"optuna-dashboard {mask_url(dash.url)}")

    @app.get("/studies/{name}", response_class=HTMLResponse)
    def study_page(name: str) -> Response:
        info = dash.study(name)
        summary = study_summary(dash.store, info, dash.launcher.get(name))
        detail = study_detail(dash.store, name)
        return dash.page("study.html", study=summary, detail=detail, has_weights=study_has_weights(info),
                         initial={"study": summary, **detail, "version": _version(info), "poll_ms": poll_ms},
                         optuna=f"optuna-dashboard {mask_url(dash.url)}")

    @app.get("/studies/{name}/arch/{arch_hash}", response_class=HTMLResponse)
    def arch_page(name: str, arch_hash: str) -> Response:
        info = dash.study(name)
        arch = dash.architecture(info, arch_hash)
        view = architecture_view(dash.store, info, arch)
        stem = export_stem(name, arch_hash)
        files = dash.exported_files(stem)
        front = {r["arch_hash"]: r for r in dash.store.front(name)}
        return dash.page("arch.html", study=study_summary(dash.store, info, dash.launcher.get(name)), arch=arch,
                         view=view, files=files, has_weights=study_has_weights(info),
                         on_front=front.get(arch_hash))

    # ---- JSON ---------------------------------------------------------------------------

    @app.get("/api/studies")
    def api_studies() -> Response:
        return JSONResponse({"studies": [study_summary(dash.store, s, dash.launcher.get(s.name))
                                         for s in dash.store.studies()]})

    @app.get("/api/studies/{name}")
    def api_study(name: str, v: str | None = None) -> Response:
        info = dash.study(name)
        out: dict[str, Any] = {"study": study_summary(dash.store, info, dash.launcher.get(name)),
                               "version": _version(info)}
        if v != out["version"]:  # the heavy part only when something was recorded since the page's copy
            out.update(study_detail(dash.store, name))
        return JSONResponse(out)

    # ---- actions (POST + CSRF) ----------------------------------------------------------

    @app.post("/studies/{name}/resume")
    def resume(request: Request, name: str, form: dict[str, str] = Depends(csrf_form)) -> Response:  # noqa: B008
        info = dash.study(name)
        back = f"/studies/{name}"
        text = (form.get("budget") or "").strip()
        budget = None if not text else text if text.startswith("+") else "+" + text

        def check() -> None:
            """The lifecycle's checks of a resume, as HTTP errors: a live driver first (409; its own
            budget is its business), then the added budget, a completed study, nothing to run (400)."""
            try:
                lifecycle.check_resume(dash.store, name, budget, need_budget_left=True)
            except lifecycle.StudyRunning as e:
                raise HTTPException(409, str(e)) from None
            except SearchError as e:
                raise HTTPException(400, str(e)) from None

        check()
        if budget is not None:
            budget = f"+{lifecycle.parse_increment(budget)}"  # normalised, as the log shows it
        try:
            launch = dash.launcher.start(name, budget, info.config.get("workdir"), check,
                                         trials_before=info.trials_done)
        except LaunchError as e:
            raise HTTPException(409 if "still running" in str(e) else 500, str(e)) from None
        return dash.answer(request, f"resuming {name}" + (f" with {budget} more budget" if budget else "")
                           + f" (pid {launch.proc.pid})", back, pid=launch.proc.pid)

    @app.post("/studies/{name}/stop")
    def stop(request: Request, name: str, form: dict[str, str] = Depends(csrf_form)) -> Response:  # noqa: B008
        dash.study(name)
        launch = dash.launcher.get(name)
        starting = launch is not None and launch.running and not launch.seen_running  # a resume launched here
        live = dash.store.live_driver(name)
        if starting and (live is None or live[0] != launch.proc.pid):  # type: ignore[union-attr]
            dash.launcher.terminate(name)  # still starting: no driver to notice a request yet
        res = lifecycle.stop(dash.store, name, force=starting)
        return dash.answer(request, res.message, f"/studies/{name}")

    @app.post("/studies/{name}/export")
    def export(request: Request, name: str, form: dict[str, str] = Depends(csrf_form)) -> Response:  # noqa: B008
        from nas.export import PICKS, ExportError, export_study, pick_from_study

        info = dash.study(name)
        arch = (form.get("arch") or "").strip().lower()
        pick = (form.get("pick") or "").strip() or "accuracy"
        if arch and not HEX64.match(arch):
            raise HTTPException(400, "arch must be a full architecture hash (64 hex digits)")
        if not arch and pick not in PICKS:
            raise HTTPException(400, f"pick must be one of {', '.join(PICKS)}, got {pick!r}")
        if arch:
            dash.architecture(info, arch)
        weights = form.get("weights", "") in ("1", "on", "true", "yes") and study_has_weights(info)
        with dash.export_lock:
            dash.make_export_dir()
            try:
                if not arch:
                    arch = pick_from_study(dash.store, name, pick=pick)[0].hash
                stem = export_stem(name, arch)
                out = dash.export_dir / f"{stem}.py"
                wfile = dash.export_dir / f"{stem}.safetensors" if weights else None
                res = export_study(dash.store, name, out, arch=arch, weights=wfile)
            except ExportError as e:
                raise HTTPException(400, str(e)) from None
            except Exception as e:  # a model that does not build, a supernet that does not load
                first = str(e).splitlines()[0] if str(e) else ""
                raise HTTPException(500, f"export failed: {type(e).__name__}: {first}") from None
            files = [out.name]
            if wfile is not None and res.weights_source == "initial":  # not in the supernet: no trained weights
                wfile.unlink(missing_ok=True)
                wfile = None
            target = out.name
            dash.remember(out)
            if wfile is not None:
                files.append(wfile.name)
                target = f"{stem}.zip"
                _zip(dash.export_dir / target, [out, wfile])
                dash.remember(wfile)
                dash.remember(dash.export_dir / target)
        url = f"/exports/{target}"
        return dash.answer(request, f"exported {res.spec.short()}", f"/studies/{name}", url=url, files=files,
                           weights=res.weights_source if wfile is not None else None, hash=arch)

    # ---- downloads and static files -----------------------------------------------------

    @app.get("/exports/{filename}")
    def download(filename: str) -> Response:
        if not EXPORT_NAME.match(filename):
            raise HTTPException(404, "no such export")
        path = dash.export_dir / filename
        if path.is_symlink() or path.resolve().parent != dash.export_dir:
            raise HTTPException(404, "no such export")
        opened = dash.open_export(filename)  # only the very file this process wrote there
        if opened is None:
            raise HTTPException(404, "no such export")
        fd, st = opened
        return StreamingResponse(_read_fd(fd), media_type=_MEDIA[path.suffix],
                                 headers={"Content-Disposition": f'attachment; filename="{filename}"',
                                          "Content-Length": str(st.st_size), "Cache-Control": "no-store"})

    plotly_js = _plotly_js()

    @app.get("/static/plotly.min.js", include_in_schema=False)
    def plotly() -> Response:
        if plotly_js is None:
            raise HTTPException(500, "plotly is not installed: pip install plotly")
        return FileResponse(plotly_js, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    app.mount("/static", StaticFiles(directory=str(PKG / "static")), name="static")
    app.add_middleware(SecurityHeaders)  # outermost of ours: on every answer
    return app


def _read_fd(fd: int, chunk: int = 1 << 16) -> Iterator[bytes]:
    """The content of an open file descriptor, in chunks; closes it."""
    try:
        while data := os.read(fd, chunk):
            yield data
    finally:
        os.close(fd)


def _version(info: StudyInfo) -> str:
    """Changes whenever the study records an evaluation or changes status."""
    return f"{info.updated_at.isoformat()}|{info.trials_done}|{info.used_seconds:.6f}|{info.status}"


def _secure(resp: Response) -> Response:
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("X-Frame-Options", "DENY")
    resp.headers.setdefault("Referrer-Policy", "no-referrer")
    resp.headers.setdefault("Content-Security-Policy", _CSP)
    resp.headers.setdefault("Cache-Control", "no-store")
    return resp


def _zip(dest: Path, files: list[Path]) -> None:
    """A zip of ``files`` (by their names) written atomically."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for f in files:
                z.write(f, arcname=f.name)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _plotly_js() -> Path | None:
    """plotly.min.js from the installed plotly package (nothing is loaded from the internet)."""
    import importlib.util

    spec = importlib.util.find_spec("plotly")
    for base in (spec.submodule_search_locations or []) if spec else []:
        p = Path(base) / "package_data" / "plotly.min.js"
        if p.is_file():
            return p
    return None
