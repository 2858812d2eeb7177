"""Both job backends satisfy the contracts of utils/contracts.py: every member exists (runtime_checkable
isinstance) and every method accepts what the protocol declares (inspect.signature), so the Runtime can
call either backend the same way. Redis-backed objects are only built here (no command is sent), so no
redis-server is needed."""
from __future__ import annotations

import inspect
import threading

import pytest

from tests.helpers.contracts import incompatibilities, protocol_methods
from utils import contracts
from utils.config import Settings

REDIS_URL = "redis://127.0.0.1:1/0"   # never contacted: constructors send no command


def _sqlite_store(tmp_path):
    from utils.jobs.local.store import SqliteJobStore
    return SqliteJobStore(tmp_path / "jobs.db")


def _redis_store(tmp_path):
    from utils.jobs.cluster.store import RedisJobStore
    return RedisJobStore(REDIS_URL)


def _job_threads(tmp_path):
    from utils.jobs.local.threads import JobThreads
    return JobThreads(_sqlite_store(tmp_path), lambda *a: None, ready=threading.Event())


def _rq_queue(tmp_path):
    from utils.jobs.cluster.queue import RqJobQueue
    return RqJobQueue(_redis_store(tmp_path), Settings(data_dir=tmp_path, queue_url=REDIS_URL))


def _memory_events(tmp_path):
    from utils.jobs.events import MemoryEventLog
    return MemoryEventLog()


def _redis_events(tmp_path):
    from utils.jobs.cluster.events import RedisEventLog
    store = _redis_store(tmp_path)
    return RedisEventLog(store.redis, prefix=store.prefix)


def _sqlite_idempotency(tmp_path):
    from utils.jobs.local.idempotency import SqliteIdempotencyStore
    return SqliteIdempotencyStore(tmp_path / "jobs.db", hours=1)


def _redis_idempotency(tmp_path):
    from utils.jobs.cluster.idempotency import RedisIdempotencyStore
    return RedisIdempotencyStore(_redis_store(tmp_path).redis, hours=1)


def _engine(tmp_path):
    from utils.engine.generator import DigitalTwinGenerator
    return DigitalTwinGenerator(Settings(data_dir=tmp_path))      # nothing loads before setup()


def _generator_process(tmp_path):
    from utils.engine.generator import DigitalTwinGenerator
    from utils.jobs.local.generator_process import GeneratorProcess
    return GeneratorProcess(Settings(data_dir=tmp_path), engine_class=DigitalTwinGenerator)  # no child yet


def _fake_engine(tmp_path):
    from tests.fakes import FakeGenerator
    return FakeGenerator()


def _fake_model_engine(tmp_path):
    from tests.fakes import FakeModelGenerator
    return FakeModelGenerator()


def _face_service(tmp_path):
    from utils.faces import FaceService
    return FaceService(Settings(data_dir=tmp_path))


def _fake_faces(tmp_path):
    from tests.fakes import FakeFaceService
    return FakeFaceService()


def _cli_faces(tmp_path):
    from tests.fakes import CliFaceService
    return CliFaceService()


def _request_type(tmp_path):
    from utils.engine.request import GenerationRequest
    return GenerationRequest(prompt="p")


def _fake_request(tmp_path):
    from tests.fakes import FakeGenerationRequest
    return FakeGenerationRequest(prompt="p")


def _local_storage(tmp_path):
    from utils.storage.local import LocalStorage
    return LocalStorage(tmp_path / "data")


def _s3_storage(tmp_path):
    from utils.storage.bucket import Bucket
    from utils.storage.cache import ObjectCache
    from utils.storage.s3 import S3Storage
    # Never contacted: building the client sends no request.
    return S3Storage(Bucket("s3://contract-test/p", endpoint_url="http://127.0.0.1:1", addressing_style="path"),
                     ObjectCache(tmp_path / "cache", 1 << 20))


def _fake_flux_identity_method(tmp_path):
    from tests.fakes import FakeFluxIdentityMethod
    return FakeFluxIdentityMethod()


def _safety_guard(tmp_path):
    from utils.config import Settings
    from utils.safety.guard import SafetyGuard
    return SafetyGuard(Settings(data_dir=tmp_path / "data"))


def _fake_safety(tmp_path):
    from tests.fakes import fake_safety
    from utils.config import Settings
    return fake_safety(Settings(data_dir=tmp_path / "data"))


# (protocol, implementation factory, the optional capabilities it has, those it must not claim)
CASES = [
    (contracts.JobStore, _sqlite_store, [], [contracts.Reachable]),
    (contracts.JobStore, _redis_store, [contracts.Reachable], []),
    (contracts.JobQueue, _job_threads, [],
     [contracts.ClusterStatus, contracts.ClusterSingleton, contracts.ModelRouting]),
    (contracts.JobQueue, _rq_queue, [contracts.ClusterStatus, contracts.ClusterSingleton, contracts.ModelRouting], []),
    (contracts.EventLog, _memory_events, [], []),
    (contracts.EventLog, _redis_events, [], []),
    (contracts.IdempotencyStore, _sqlite_idempotency, [], []),
    (contracts.IdempotencyStore, _redis_idempotency, [], []),
    (contracts.Engine, _engine, [contracts.ModelRegistry, contracts.Trainer], []),
    (contracts.Engine, _generator_process, [contracts.ModelRegistry, contracts.Trainer], []),
    (contracts.Engine, _fake_engine, [], [contracts.ModelRegistry, contracts.Trainer]),
    (contracts.Engine, _fake_model_engine, [contracts.ModelRegistry], [contracts.Trainer]),
    (contracts.FaceService, _face_service, [], []),
    (contracts.FaceService, _fake_faces, [], []),
    (contracts.FaceService, _cli_faces, [], []),
    (contracts.GenerationRequestType, _request_type, [], []),
    (contracts.GenerationRequestType, _fake_request, [], []),
    (contracts.Storage, _local_storage, [], [contracts.PresignedDownloads, contracts.CachedReads]),
    (contracts.Storage, _s3_storage, [contracts.PresignedDownloads, contracts.CachedReads], []),
    (contracts.FluxIdentityMethod, _fake_flux_identity_method, [], []),
    (contracts.OutputSafety, _safety_guard, [], []),
    (contracts.OutputSafety, _fake_safety, [], []),
]
IDS = [f"{proto.__name__}-{make.__name__.lstrip('_')}" for proto, make, _, _ in CASES]


@pytest.mark.parametrize("proto, make, has, lacks", CASES, ids=IDS)
def test_implementation_satisfies_its_protocol(proto, make, has, lacks, tmp_path):
    impl = make(tmp_path)
    try:
        assert isinstance(impl, proto)
        methods = protocol_methods(proto)
        assert methods, f"{proto.__name__} declares no method: the check would pass vacuously"
        for cap in has:
            assert isinstance(impl, cap), f"{type(impl).__name__} lacks {cap.__name__}"
            methods.update(protocol_methods(cap))
        for cap in lacks:
            assert not isinstance(impl, cap), f"{type(impl).__name__} claims {cap.__name__}"
        bad = {name: p for name, sig in methods.items() if (p := incompatibilities(sig, getattr(impl, name)))}
        assert bad == {}, f"{type(impl).__name__}: {bad}"
    finally:
        close = getattr(impl, "close", None)
        if callable(close):
            close()


@pytest.mark.parametrize("proto", [contracts.JobStore, contracts.JobQueue, contracts.EventLog,
                                   contracts.IdempotencyStore, contracts.Reachable, contracts.ClusterStatus,
                                   contracts.ClusterSingleton, contracts.ModelRouting, contracts.Engine,
                                   contracts.ModelRegistry, contracts.FaceService, contracts.GenerationRequestType,
                                   contracts.FamilyModel, contracts.Storage, contracts.PresignedDownloads,
                                   contracts.CachedReads, contracts.OutputSafety, contracts.Trainer])
def test_a_protocol_refuses_an_object_without_its_members(proto):
    assert not isinstance(object(), proto)


@pytest.mark.parametrize("declared, impl, problem", [
    (lambda self, a, b=1: None, lambda a, b=1, c=2: None, None),                    # extra optional: fine
    (lambda self, a, *, k=None: None, lambda a, k=None: None, None),                # keyword-only -> either
    (lambda self, a: None, lambda b: None, "no parameter 'a'"),
    (lambda self, a, b=1: None, lambda a, b: None, "'b' is optional in the contract but required here"),
    (lambda self, a: None, lambda a, extra: None, "extra required parameter 'extra'"),
    (lambda self, a, *, k=None: None, lambda a, **kw: None, None),                  # **kwargs takes k
    (lambda self, a, b: None, lambda b, a: None, "'a' is not positional parameter 1"),
])
def test_the_signature_check_itself(declared, impl, problem):
    """Guards the check above against passing everything."""
    found = incompatibilities(inspect.signature(declared), impl)
    if problem is None:
        assert found == []
    else:
        assert problem in found, found


BACKEND_PROTOCOLS = [contracts.JobStore, contracts.JobQueue, contracts.EventLog, contracts.IdempotencyStore]


def test_test_doubles_of_a_job_backend_satisfy_its_protocol():
    """A class in tests/fakes.py with half or more of a backend protocol's methods stands in for that
    backend and must have all of them (then it belongs in CASES too). Today the doubles there are of the
    engine and the face service only, so none qualifies."""
    import tests.fakes as fakes
    classes = [c for c in vars(fakes).values() if inspect.isclass(c) and c.__module__ == fakes.__name__]
    assert any(c.__name__ == "FakeGenerator" for c in classes)  # the module was read
    for cls in classes:
        for proto in BACKEND_PROTOCOLS:
            names = set(protocol_methods(proto))
            if len(names & set(dir(cls))) * 2 >= len(names):
                assert names <= set(dir(cls)), f"{cls.__name__} stands in for {proto.__name__} but lacks " \
                                               f"{sorted(names - set(dir(cls)))}"


def test_a_loaded_family_model_satisfies_its_protocol(tiny_generator):
    """The SDXL family (utils/engine/families/sdxl.py), as the engine holds it once set up."""
    model = tiny_generator.model
    assert isinstance(model, contracts.FamilyModel)
    methods = protocol_methods(contracts.FamilyModel)
    bad = {name: p for name, sig in methods.items() if (p := incompatibilities(sig, getattr(model, name)))}
    assert methods and bad == {}, bad
