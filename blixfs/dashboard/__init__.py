"""The built-in dashboard: JSON of the daemon's state (`api`), its HTTP server (`server`)
and the page it serves (``static/``: HTML, CSS and JavaScript shipped in the package).
See docs/dashboard.md."""
