"""gunicorn entry point on the fakes (``tests.fake_server_app:create()``), so the real-server tests run
before the engines exist. ``FAKE_STEP_SECONDS`` slows each denoising step (restart tests).
``create_likeness()``: the real dlib face service and a generator that returns a real face photo, for
the page's likeness / restoration controls."""
import os

from app import create_app
from tests.fakes import FakeFaceService, FakeGenerator, fake_safety
from utils.config import Settings


def _safety(settings=None):
    """The real guard on a classifier double: FAKE_SAFETY_SCORES (comma-separated, default 0) in turn."""
    scores = [float(x) for x in os.environ.get("FAKE_SAFETY_SCORES", "0").split(",")]
    return fake_safety(settings or Settings.from_env(), scores)


def create():
    return create_app(generator=FakeGenerator(step_seconds=float(os.environ.get("FAKE_STEP_SECONDS", "0"))),
                      faces=FakeFaceService(), safety=_safety())


def worker_components(settings):
    """``python -m utils.service.gpu_worker --components tests.fake_server_app:worker_components``: a cluster
    GPU worker on the doubles (FAKE_STEP_SECONDS per step). With FAKE_MODELS (comma-separated names) the
    generator double has a base-model registry: FAKE_MODEL active, FAKE_LOAD_SECONDS per load."""
    step = float(os.environ.get("FAKE_STEP_SECONDS", "0"))
    if os.environ.get("FAKE_MODELS"):
        from tests.fakes import FakeModelGenerator
        models = os.environ["FAKE_MODELS"].split(",")
        return FakeModelGenerator(models=models, active=os.environ.get("FAKE_MODEL", models[0]),
                                  load_seconds=float(os.environ.get("FAKE_LOAD_SECONDS", "0")),
                                  step_seconds=step), FakeFaceService(), _safety(settings)
    return FakeGenerator(step_seconds=step), FakeFaceService(), _safety(settings)

def create_likeness():
    from tests.fakes import PhotoGenerator
    from utils.faces import FaceService
    return create_app(generator=PhotoGenerator(step_seconds=float(os.environ.get("FAKE_STEP_SECONDS", "0"))),
                      faces=FaceService(Settings.from_env()), safety=_safety())


def tiny_worker_components(settings):
    """A GPU worker with the real engine on the tiny profile (TWIN_MODEL_PROFILE=tiny, TWIN_TINY_MODEL_DIR) and
    the face double: what twin training needs of a worker, without face models."""
    from utils.engine.generator import DigitalTwinGenerator
    return DigitalTwinGenerator(settings), FakeFaceService()
