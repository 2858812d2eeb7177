"""utils.request_fields: one declared row gives the check, the OpenAPI schema and the published entry."""
import math

import pytest

from generate_twin import REQUEST_FIELDS, GenerationRequest, published_options
from utils.api.openapi import build_spec
from utils.config import Settings
from utils.errors import InvalidRequest
from utils.request_fields import Field, validate_payload

S = Settings()
FIELDS = (
    Field("name", "string", required=True, strip=True, min_length=1, max_length=5),
    Field("count", "integer", default=1, minimum=1, maximum=lambda s: 3),
    Field("side", "integer", multiple_of=8, minimum=64, maximum=128,
          message="{name}={value!r} must be a multiple of 8 between {minimum} and {maximum}"),
    Field("scale", "number", default=0.5, minimum=0.0, maximum=1.5),
    Field("mode", "string", default="a", enum=("a", "b")),
    Field("flag", "boolean", default=False),
    Field("extra", "object"),
)


@pytest.mark.parametrize("payload, expected", [
    ({"name": " ab "}, {"name": "ab", "count": 1, "side": None, "scale": 0.5, "mode": "a", "flag": False, "extra": None}),
    ({"name": "x", "count": 3, "side": 72, "scale": 1, "mode": "b", "flag": True, "extra": {"k": 1}},
     {"name": "x", "count": 3, "side": 72, "scale": 1.0, "mode": "b", "flag": True, "extra": {"k": 1}}),
    ({"name": "x", "count": None, "scale": None}, {"name": "x", "count": 1, "side": None, "scale": 0.5, "mode": "a",
                                                   "flag": False, "extra": None}),
])
def test_valid_payloads_fill_defaults(payload, expected):
    assert validate_payload(FIELDS, payload, S) == expected


@pytest.mark.parametrize("payload, message", [
    ({}, "name=None must be a non-empty string"),
    ({"name": "   "}, "name='   ' must be a non-empty string"),
    ({"name": 3}, "name=3 must be a string"),
    ({"name": "abcdef"}, "name has 6 characters; at most 5 are allowed"),
    ({"name": "x", "count": 4}, "count=4 is not an integer between 1 and 3"),
    ({"name": "x", "count": True}, "count=True is not an integer between 1 and 3"),
    ({"name": "x", "count": 1.0}, "count=1.0 is not an integer between 1 and 3"),
    ({"name": "x", "side": 70}, "side=70 must be a multiple of 8 between 64 and 128"),
    ({"name": "x", "scale": "1"}, "scale='1' is not a number"),
    ({"name": "x", "scale": math.inf}, "scale=inf is not a finite number"),
    ({"name": "x", "scale": 2}, "scale=2 is not between 0.0 and 1.5"),
    ({"name": "x", "mode": "c"}, "mode='c' is not one of a, b"),
    ({"name": "x", "mode": ["a"]}, "mode=['a'] must be a string"),
    ({"name": "x", "flag": 1}, "flag=1 is not true or false"),
    ({"name": "x", "extra": []}, "extra=[] is not a JSON object"),
    ({"name": "x", "zzz": 1, "aaa": 2}, "unknown field(s): aaa, zzz; allowed: name, count, side, scale, mode, flag, extra"),
    (["name"], "request body must be a JSON object, not list"),
])
def test_invalid_payloads_name_the_value(payload, message):
    with pytest.raises(InvalidRequest) as e:
        validate_payload(FIELDS, payload, S)
    assert e.value.message == message and e.value.http_status == 400


def test_the_request_dataclass_and_the_table_agree():
    import dataclasses
    from utils.engine.request import FIELD_ATTRIBUTES
    # The JSON field "identity" is the attribute identity_source. The attributes identity, twin and init_pixels
    # are attached after validation (with_identity / with_twin / with_init_image), and given (the fields the
    # payload set, for the family checks) by from_dict: none is a request field.
    declared = [FIELD_ATTRIBUTES.get(f.name, f.name) for f in REQUEST_FIELDS]
    attached = ("identity", "twin", "init_pixels", "given")
    assert declared == [f.name for f in dataclasses.fields(GenerationRequest) if f.name not in attached]


def test_openapi_and_published_options_come_from_the_table():
    spec = build_spec(S)["components"]["schemas"]["GenerateRequest"]
    from utils.jobs.webhooks import WEBHOOK_FIELDS
    assert set(spec["properties"]) == {f.name for f in REQUEST_FIELDS + WEBHOOK_FIELDS} | {"session_id"}
    assert spec["required"] == ["prompt"]
    assert spec["properties"]["width"] == {
        "type": "integer", "minimum": S.min_image_side, "maximum": S.max_image_side, "multipleOf": 8,
        "description": "Output width; with height, instead of aspect_ratio.", "nullable": True,
        # the family table beside the field rows (request.APPLICABILITY): FLUX packs 2x2 latents per token
        "x-applies-to": {"sdxl": "in multiples of 8", "flux": "in multiples of 16 (2x2 latents are packed into one token)"}}
    published = published_options(1024, S)["request_fields"]
    assert set(published) == {f.name for f in REQUEST_FIELDS}
    assert published["identity_strength"]["default"] == S.default_identity_strength
    assert published["quality_mode"]["enum"] == ["fast", "balanced", "high_fidelity"]
