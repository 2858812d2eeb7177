"""gunicorn entry point on the fakes (``tests.fake_server_app:create()``), so the real-server tests run
before the engines exist. ``FAKE_STEP_SECONDS`` slows each denoising step (restart tests).
``create_likeness()``: the real dlib face service and a generator that returns a real face photo, for
the page's likeness / restoration controls."""
import os

from app import create_app
from tests.fakes import FakeFaceService, FakeGenerator


def create():
    return create_app(generator=FakeGenerator(step_seconds=float(os.environ.get("FAKE_STEP_SECONDS", "0"))),
                      faces=FakeFaceService())


def worker_components(settings):
    """``python -m utils.jobs.rq_worker --components tests.fake_server_app:worker_components``: a cluster
    GPU worker on the doubles (FAKE_STEP_SECONDS per step)."""
    return FakeGenerator(step_seconds=float(os.environ.get("FAKE_STEP_SECONDS", "0"))), FakeFaceService()

def create_likeness():
    from tests.fakes import PhotoGenerator
    from utils.config import Settings
    from utils.faces import FaceService
    return create_app(generator=PhotoGenerator(step_seconds=float(os.environ.get("FAKE_STEP_SECONDS", "0"))),
                      faces=FaceService(Settings.from_env()))
