"""HTTP-facing helpers that app.py uses: who the caller is (``auth``), request security and rate limits
(``security``), and the OpenAPI document (``openapi``)."""
