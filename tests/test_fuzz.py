"""Property-based API fuzzing against /openapi.json (schemathesis), on the real tiny profile.

Every operation gets schema-valid (positive) and schema-violating (negative) examples, with the
caller's client token so requests reach the handlers' real work. Checks: no 5xx ever; for positive
examples also a documented status, a documented content type and a body that matches its schema.
The figures (examples run, server errors) are reported and asserted.
"""
from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, Phase, given, settings as hsettings
from hypothesis.errors import Unsatisfiable

schemathesis = pytest.importorskip("schemathesis")

from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,  # noqa: E402
                                               status_code_conformance)

pytestmark = pytest.mark.slow

POSITIVE_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
NEGATIVE_CHECKS = [not_a_server_error]
EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 25}


@pytest.fixture
def fuzz_app(make_app, service_settings, tiny_generator, face_service):
    """The app on the real tiny generator and dlib faces; small image sides keep queued jobs cheap."""
    s = service_settings.replace(max_image_side=128, queue_max=10_000, max_selfies=4, max_file_mb=1.0, max_upload_mb=4.0)
    return make_app(s, generator=tiny_generator, faces=face_service)


def test_schemathesis_finds_no_server_errors(fuzz_app, report_metric):
    from tests.helpers.http import upload_token
    from tests.photos import selfie_set
    client = fuzz_app.test_client()
    token = upload_token(client, selfie_set(1))
    job = client.post("/generate", json={"prompt": "seed job", "width": 64, "height": 64}, headers=token).get_json()
    deadline = time.time() + 60
    while client.get(f"/status/{job['id']}", headers=token).get_json()["status"] not in ("succeeded", "failed"):
        assert time.time() < deadline
        time.sleep(0.05)

    schema = schemathesis.openapi.from_wsgi("/openapi.json", fuzz_app)
    counts = {"examples": 0, "server_errors": 0, "operations": 0}
    statuses: dict[int, int] = {}
    failures: list[str] = []
    timings: dict[str, float] = {}

    def run(operation, mode, **fixed):
        t_op = time.perf_counter()
        strategy = operation.as_strategy(generation_mode=mode, headers=token, **fixed)
        checks = POSITIVE_CHECKS if mode == GenerationMode.POSITIVE else NEGATIVE_CHECKS

        @hsettings(max_examples=EXAMPLES[mode], deadline=None, database=None, derandomize=True,
                   phases=[Phase.explicit, Phase.generate],
                   suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def one(case):
            response = case.call()
            counts["examples"] += 1
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code >= 500:
                counts["server_errors"] += 1
            try:
                case.validate_response(response, checks=checks)
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - schemathesis raises a FailureGroup
                failures.append(f"{operation.label} [{mode.value}]: {str(exc)[:600]}")

        try:
            one()
        except Unsatisfiable:
            # No way to violate the schema of an operation without inputs (GET /health): nothing to send.
            assert mode == GenerationMode.NEGATIVE, operation.label
        timings[f"{operation.label} [{mode.value}]"] = round(time.perf_counter() - t_op, 1)

    t0 = time.perf_counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        counts["operations"] += 1
        for mode in EXAMPLES:
            run(operation, mode)
        # Again with a real job id, so status/cancel/download reach an existing job of this caller.
        if "{job_id}" in operation.path:
            run(operation, GenerationMode.POSITIVE, path_parameters={"job_id": job["id"]})
    seconds = time.perf_counter() - t0

    report_metric("schemathesis operations fuzzed", counts["operations"])
    report_metric("schemathesis examples run", counts["examples"])
    report_metric("schemathesis server errors", counts["server_errors"])
    report_metric("schemathesis answers by status", dict(sorted(statuses.items())))
    report_metric("schemathesis run seconds", round(seconds, 1))
    print("seconds per operation:", timings)
    assert counts["server_errors"] == 0, failures[:5]
    assert not failures, "\n".join(failures[:10])
    assert counts["operations"] >= 8 and counts["examples"] >= 400
    assert fuzz_app.test_client().get("/health").get_json()["state"] == "ready"
