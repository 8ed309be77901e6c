"""The playground page at GET /: plain HTML, JS and CSS shipped in the package (static/), no
CDN and no build step. The page is open like /health; what it calls under /v1/ is guarded as
any client's call is, with the key the user types (it learns one is needed from a 401)."""

from __future__ import annotations

from pathlib import Path

from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"

# Only this origin's own files and calls; images arrive as data: URLs. No inline script or
# style is allowed, so app.js and style.css are separate files under /static/.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-cache"}


def page() -> FileResponse:
    """index.html with its security headers."""
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


def static_files() -> StaticFiles:
    """The page's script and stylesheet, served under /static/."""
    return StaticFiles(directory=STATIC)
