"""``adapterhub ui``: a local, offline, server-rendered web view of the catalog (docs/ui.md).

:func:`adapterhub.ui.app.create_app` builds the Starlette app over a Workspace; the page data builders
are :mod:`adapterhub.ui.pages`, the SVG pictures :mod:`adapterhub.ui.svg`, the safety settings and their
middleware :mod:`adapterhub.ui.security`. Needs the ``ui`` extra (starlette, jinja2, uvicorn,
markdown-it-py); importing this package alone imports none of them.
"""
