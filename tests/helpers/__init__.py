"""Helpers shared by test modules, one module per concern (a test module never imports another one):

- ``http``      the multipart ``files`` field, uploads (test client and real server), submit, wait for a job,
                the error body
- ``sse``       parse a text/event-stream body
- ``images``    hand-made image files (PNG chunks, header-only PNG bombs, EXIF-rotated JPEGs)
- ``cluster``   cluster-mode settings and environment, GPU worker subprocesses, the cluster's HTTP steps
- ``webhooks``  a loopback webhook receiver and README's verification example
- ``wait``      ``wait_until``

Fixtures live in tests/fixtures/ (registered in tests/conftest.py); test doubles in tests/fakes.py;
real face photos from installed packages in tests/photos.py.
"""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
