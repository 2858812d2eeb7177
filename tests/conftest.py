"""Test-session set-up: offline, deterministic, one thread.

Fixtures live in tests/fixtures/ by area (models, faces, service, cluster, ...) and are registered here;
helpers that several test modules share live in tests/helpers/ (a test module never imports another).
"""
import os

# Before anything imports huggingface_hub / transformers: no network, ever.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# Stray TWIN_* variables from the developer's shell must not change what tests see (TWIN_TEST_* ones are
# the test suite's own, e.g. TWIN_TEST_S3_URL in tests/fixtures/s3.py; the service ignores them).
for _k in [k for k in os.environ if k.startswith("TWIN_") and not k.startswith("TWIN_TEST_")]:
    del os.environ[_k]

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.faces",
    "tests.fixtures.service",
    "tests.fixtures.metrics",
    "tests.fixtures.redis_server",
    "tests.fixtures.cluster",
    "tests.fixtures.s3",
    "tests.fixtures.browser",
]
