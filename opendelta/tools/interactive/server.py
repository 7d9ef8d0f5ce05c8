"""A one-shot local web page for choosing the modules to modify, on ``http.server``.

The page shows the folded module tree (see :mod:`opendelta.tools.visualization`) and
posts the selected full module names to ``/submit``. The server then hands them to the
waiting Python call and stops. Only the standard library is used.

Safety: the server binds ``127.0.0.1`` by default; a submission must carry the random
token embedded in the page (a custom header, which other web sites cannot send without a
CORS preflight this server never grants), and, on a loopback address, a ``Host`` header
naming it (defeats DNS rebinding).
"""
from __future__ import annotations

import json
import secrets
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set

from torch import nn

from ...core.layers import DeltaLayer
from ..visualization import StructureNode, build_structure

TEMPLATE = Path(__file__).with_name("templates") / "index.html"
TOKEN_HEADER = "X-Opendelta-Token"
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_MAX_BODY = 16 * 2 ** 20


def tree_json(node: StructureNode) -> Dict[str, Any]:
    """The compact JSON form of a folded tree that the page renders.

    ``{"n": names, "t": type, "p": [[label, state], ...], "c": [children]}``.
    """
    return {"n": list(node.names), "t": node.type_name,
            "p": [[p.label, p.state] for p in node.params],
            "c": [tree_json(c) for c in node.children]}


def selectable_names(model: nn.Module) -> Set[str]:
    """Full names of ``model``'s modules that a delta can modify: not the root, not delta
    layers nor anything inside them."""
    out: Set[str] = set()
    stack = [("", model)]
    while stack:
        prefix, module = stack.pop()
        for name, child in module._modules.items():
            if child is None or isinstance(child, DeltaLayer):
                continue
            full = f"{prefix}.{name}" if prefix else name
            out.add(full)
            stack.append((full, child))
    return out


def render_page(model: nn.Module, token: str, title: str) -> bytes:
    """The page for ``model``: the template with the tree (as JSON) and the token filled in."""
    structure = build_structure(model, rootname=title, skip_deltas=True)
    data = json.dumps({"tree": tree_json(structure), "token": token, "title": title})
    # Inside <script>: "<" escaped so that no module name can close the element.
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    page = TEMPLATE.read_text(encoding="utf-8")
    if "__OPENDELTA_DATA__" not in page:
        raise RuntimeError(f"{TEMPLATE} lacks the __OPENDELTA_DATA__ placeholder; reinstall opendelta")
    return page.replace("__OPENDELTA_DATA__", data).encode("utf-8")


class SelectionServer(ThreadingHTTPServer):
    """Serves the page and waits for one valid submission (see :meth:`wait`)."""

    daemon_threads = True

    def __init__(self, model: nn.Module, host: str = "127.0.0.1", port: int = 0, title: str = "root"):
        self.token = secrets.token_urlsafe(24)
        self.page = render_page(model, self.token, title)
        self.valid_names = selectable_names(model)
        self.selection: Optional[List[str]] = None
        self.submitted = threading.Event()
        try:
            super().__init__((host, port), _Handler)
        except OSError as err:
            raise OSError(f"cannot serve the module picker on {host}:{port} ({err.strerror or err}); "
                          "pass another port, or interactive_modify=True to pick a free one") from err
        self.host = host
        self.port = self.server_address[1]
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def allowed_host(self, header: Optional[str]) -> bool:
        if self.host not in _LOOPBACK:
            return True
        if header is None:
            return False
        return header in {f"{h}:{self.port}" for h in ("127.0.0.1", "localhost", "[::1]")}

    def validate(self, names: Any) -> List[str]:
        """The submitted names, checked: a non-empty list of real module names, de-duplicated
        in order. Raises ``ValueError`` with what is wrong."""
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("'names' must be a list of module names")
        names = list(dict.fromkeys(names))
        if not names:
            raise ValueError("select at least one module")
        unknown = [n for n in names if n not in self.valid_names]
        if unknown:
            raise ValueError(f"not modules of the model: {unknown[:5]}")
        return names

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="opendelta-interactive",
                                        daemon=True)
        self._thread.start()

    def wait(self, timeout: Optional[float] = None) -> List[str]:
        """Block until the page submits a selection; then stop serving and return it.

        Raises:
            TimeoutError: nothing was submitted within ``timeout`` seconds.
        """
        try:
            if not self.submitted.wait(timeout):
                raise TimeoutError(f"no module selection was submitted within {timeout} s")
        finally:
            self.shutdown()
            self.server_close()
        assert self.selection is not None
        return self.selection


class _Handler(BaseHTTPRequestHandler):
    server: SelectionServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep the terminal clean
        pass

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, payload: Dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if not self.server.allowed_host(self.headers.get("Host")):
            self._json(HTTPStatus.FORBIDDEN, {"error": "unexpected Host header"})
        elif self.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path}"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/submit":
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {self.path}"})
            return
        if not self.server.allowed_host(self.headers.get("Host")):
            self._json(HTTPStatus.FORBIDDEN, {"error": "unexpected Host header"})
            return
        if not secrets.compare_digest(self.headers.get(TOKEN_HEADER, ""), self.server.token):
            self._json(HTTPStatus.FORBIDDEN, {"error": "missing or wrong token; reload the page"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "selection too large"})
            return
        try:
            body = json.loads(self.rfile.read(length) or b"null")
            names = self.server.validate(body.get("names") if isinstance(body, dict) else None)
        except (ValueError, json.JSONDecodeError) as err:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
            return
        if self.server.submitted.is_set():
            self._json(HTTPStatus.CONFLICT, {"error": "a selection was already submitted"})
            return
        self.server.selection = names
        self._json(HTTPStatus.OK, {"ok": True, "count": len(names)})
        self.server.submitted.set()


def exact_keys(names: Sequence[str], all_names: Set[str]) -> List[str]:
    """``modified_modules`` keys that match exactly the modules called ``names``.

    A plain key matches every module whose name *ends* with it, so a full name that is
    also the tail of another module's name (``encoder.layer.0`` inside
    ``teacher.encoder.layer.0``) becomes a regular expression anchored at the start
    (``[r]^encoder\\.layer\\.0``); other names stay readable as they are.
    """
    import re

    tails: Set[str] = set()
    for name in all_names:
        parts = name.split(".")
        for i in range(1, len(parts)):
            tails.add(".".join(parts[i:]))
    return [f"[r]^{re.escape(n)}" if n in tails else n for n in names]
