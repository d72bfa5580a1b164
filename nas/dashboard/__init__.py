"""``nas dashboard``: a web app over the study store to watch, resume, stop and export studies.

    from nas.dashboard import create_app
    app = create_app("sqlite:///nas.db")          # FastAPI app; serve() runs it with uvicorn

The machinery is private: the app and its routes in ``_app.py``, the store's JSON views in
``_data.py``, background resumes in ``_runner.py``; pages in ``templates/``, script and style in
``static/`` (Plotly comes from the installed ``plotly`` package: nothing loads from the internet).
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import sys
from pathlib import Path
from typing import TextIO

from nas.store import mask_url

from ._app import LOOPBACK_HOSTS, MIN_TOKEN, DashboardError, create_app, default_export_dir

__all__ = ["DashboardError", "check_bind", "create_app", "default_export_dir", "is_loopback", "serve"]


def _addresses(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise DashboardError(f"cannot resolve --host {host!r} ({e}); give an address such as 127.0.0.1") from None
    return sorted({str(info[4][0]) for info in infos})


def is_loopback(host: str, port: int = 0) -> bool:
    """Whether every address ``host`` resolves to is a loopback one (127.0.0.0/8, ::1)."""
    addrs = _addresses(host, port)
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def check_bind(host: str, port: int, token: str | None) -> tuple[str | None, bool]:
    """The token to require when serving on ``host:port`` and whether it was generated here.

    A loopback bind needs no token (one given is still required). Any other bind requires one: a
    missing token is generated; an empty one, or one shorter than MIN_TOKEN characters, is refused
    (as :func:`create_app` refuses it on any bind)."""
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise DashboardError(f"--port must be between 1 and 65535, got {port}")
    if not host or not host.strip():
        raise DashboardError("--host is empty; give an address such as 127.0.0.1")
    loopback = is_loopback(host, port)
    if token is not None and not token.strip():
        raise DashboardError("--token is empty: give a non-empty token, or leave --token out "
                             + ("to run without one" if loopback else "and one is generated"))
    if token is not None and len(token) < MIN_TOKEN:
        raise DashboardError(f"--token is too short ({len(token)} characters): use at least {MIN_TOKEN}, or leave "
                             "--token out " + ("to run without one" if loopback else "and one is generated"))
    if token is None and not loopback:
        return secrets.token_urlsafe(24), True
    return token, False


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (DashboardError when the port is taken or not allowed)."""
    addrs = _addresses(host, port)
    family = socket.AF_INET6 if ":" in addrs[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addrs[0], port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise DashboardError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port") from None
    sock.set_inheritable(True)
    return sock


def serve(storage_url: str, *, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          export_dir: Path | None = None, out: TextIO | None = None) -> None:
    """Serve the dashboard with uvicorn until interrupted; prints where it listens (and a generated token)."""
    import uvicorn

    out = out or sys.stdout
    token, generated = check_bind(host, port, token)
    hosts = None if token else {*LOOPBACK_HOSTS, host.lower()}
    app = create_app(storage_url, token=token, export_dir=export_dir, allowed_hosts=hosts)
    dash = app.state.dashboard
    sock = _bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    print(f"nas dashboard on {url} (store {mask_url(dash.url)}; exports in {dash.export_dir})", file=out)
    if token is not None:
        print(f"token{' (generated)' if generated else ''}: {token}", file=out)
        print(f"open {url}?token={token}", file=out)
    print(f"optuna-dashboard reads the same database: optuna-dashboard {mask_url(dash.url)}", file=out)
    out.flush()
    config = uvicorn.Config(app, log_level="warning", access_log=False, server_header=False)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
