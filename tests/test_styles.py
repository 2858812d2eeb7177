"""The style library (styles/styles.json, utils/styles.py): the shipped file, broken files, the prompt
text per strength, compel weighting on the tiny SDXL's two text encoders, GET /styles."""
from __future__ import annotations

import dataclasses
import json

import pytest

from generate_twin import ASPECT_RATIOS, DEFAULT_STYLE, GenerationRequest, style_library
from utils.config import Settings
from utils.errors import ConfigError, InvalidRequest
from utils.styles import Style, apply_style, escape_weighting, parse_styles

ARS = tuple(ASPECT_RATIOS)


def test_shipped_library_has_the_presets_the_service_promises():
    styles = style_library(Settings())
    assert len(styles) >= 20
    for name in ("none", "photoreal", "cinematic", "studio", "editorial", DEFAULT_STYLE,  # names clients already use
                 "corporate", "film_noir", "fashion", "fantasy", "cyberpunk", "watercolor", "oil_painting",
                 "anime", "render_3d", "vintage_film", "black_and_white"):
        assert name in styles, name
    assert styles["none"].positive == "{prompt}" and styles["none"].negative == ""


def _lib(**styles) -> str:
    return json.dumps({"version": 1, "styles": styles}, indent=2)


OK = {"positive": "{prompt}, x", "negative": "y"}


@pytest.mark.parametrize("text, needles", [
    ('{"styles": {\n  "a": {"positive": "{prompt}"},\n}}', ["line 3", "invalid JSON"]),          # trailing comma
    ('{"styles": {"a": ', ["line 1", "invalid JSON"]),
    ("[]", ['"styles" object']),
    (_lib(), ["no styles"]),
    (_lib(ok=OK, bad={"negative": "y"}), ["'bad'", "line 8", "exactly one {prompt}"]),
    (_lib(ok=OK, bad={"positive": "{prompt} and {prompt}"}), ["'bad'", "exactly one"]),
    (_lib(bad={"positive": "{prompt} {other}"}), ["'bad'", "brace"]),
    (_lib(bad={"positive": "{prompt}", "stepz": 3}), ["'bad'", "unknown key(s) stepz"]),
    (_lib(bad={"positive": "{prompt}", "steps": 0}), ["'bad'", "steps=0"]),
    (_lib(bad={"positive": "{prompt}", "steps": 2.5}), ["steps=2.5"]),
    (_lib(bad={"positive": "{prompt}", "guidance_scale": "high"}), ["guidance_scale='high'"]),
    (_lib(bad={"positive": "{prompt}", "aspect_ratio": "7:3"}), ["aspect_ratio='7:3'"]),
    (_lib(bad={"positive": "{prompt}", "negative": 5}), ["negative=5"]),
    (_lib(bad={"positive": "{prompt}, (heavy)1.5"}), ["'bad'", "one of ()"]),
    (_lib(bad={"positive": "{prompt}, " + "x" * 700}), ["710 characters"]),
    (_lib(**{"Bad Name": OK}), ["'Bad Name'"]),
    ('{"styles": {"a": {"positive": "{prompt}"},\n "a": {"positive": "{prompt}"}}}', ["'a' appears twice"]),
])
def test_a_broken_library_names_the_line_and_the_preset(text, needles):
    with pytest.raises(ConfigError) as e:
        parse_styles(text, "styles.json", ARS)
    for n in needles:
        assert n in e.value.message, (n, e.value.message)
    assert "styles.json" in e.value.message


def test_a_broken_file_stops_start_up(tmp_path):
    from app import create_app
    bad = tmp_path / "styles.json"
    bad.write_text('{"styles": {\n "photoreal": {"positive": "no placeholder"}}}')
    with pytest.raises(ConfigError, match=r"line 2.*'photoreal'"):
        create_app(Settings(data_dir=tmp_path / "data", styles_file=bad))


def test_a_library_without_the_default_style_stops_start_up(tmp_path):
    f = tmp_path / "styles.json"
    f.write_text(_lib(mine=OK))
    with pytest.raises(ConfigError, match="photoreal"):
        style_library(Settings(styles_file=f))


def test_an_operator_style_is_a_valid_request_value(tmp_path):
    f = tmp_path / "styles.json"
    f.write_text(_lib(none={"positive": "{prompt}"}, photoreal=OK, claymation={"positive": "clay figure of {prompt}"}))
    s = Settings(styles_file=f)
    assert GenerationRequest.from_dict({"prompt": "p", "style": "claymation"}, s).style == "claymation"
    with pytest.raises(InvalidRequest, match="style='cinematic'"):
        GenerationRequest.from_dict({"prompt": "p", "style": "cinematic"}, s)


CINE = Style("cine", "film still of {prompt}, dramatic light", "cartoon, lowres")


@pytest.mark.parametrize("style, prompt, neg, strength, positive, negative, weighted", [
    (CINE, "a man", None, 1.0, "film still of a man, dramatic light", "cartoon, lowres, BASE", False),
    (CINE, "a man", "hats", 1.0, "film still of a man, dramatic light", "hats, cartoon, lowres, BASE", False),
    (CINE, "a man", None, 0.5, "(film still of)0.5 a man (dramatic light)0.5", "(cartoon, lowres)0.5, BASE", True),
    (CINE, "a man", "hats", 0.0, "(film still of)0 a man (dramatic light)0", "hats, (cartoon, lowres)0, BASE", True),
    # The caller's words stay literal: compel's syntax in them is escaped.
    (CINE, "a (tall)1.5 man", "x-", 0.25, r"(film still of)0.25 a \(tall\)1.5 man (dramatic light)0.25",
     "x -, (cartoon, lowres)0.25, BASE", True),
    (Style("none", "{prompt}"), "a (tall) man", None, 0.5, "a (tall) man", "BASE", False),   # no style text
])
def test_style_text_per_strength(style, prompt, neg, strength, positive, negative, weighted):
    assert apply_style(style, prompt, neg, "BASE", strength) == (positive, negative, weighted)


@pytest.mark.parametrize("text, literal", [
    ("50+ yrs", "50+ yrs"), ("black-and-white", "black-and-white"), ('say "hi"', 'say "hi"'), ("a (b) c", "a (b) c"),
    ("x.and(y)", "x.and(y)"), ("back\\slash", "back\\slash"),
    ("a\\(b", "a(b"),   # known: compel drops a backslash right before a parenthesis (weight stays 1)
])
def test_escaped_user_text_parses_as_one_literal_fragment(text, literal):
    from compel.prompt_parser import PromptParser
    conj = PromptParser().parse_conjunction(escape_weighting(text))
    fragments = conj.prompts[0].children
    assert [f.weight for f in fragments] == [1.0]
    assert fragments[0].text.replace(" ", "") == literal.replace(" ", "")


def test_style_strength_weights_the_style_text_monotonically(tiny_generator):
    """compel on both tiny SDXL text encoders: strength 1 of the weighted form equals the plain prompt's
    embedding direction, and lowering the strength moves the embedding steadily away from it."""
    import torch
    base = tiny_generator.model.weighted_embeds("(film still of)1 a portrait (dramatic light)1", "")
    dists = []
    for st in (0.75, 0.5, 0.25, 0.0):
        pos, _, _ = apply_style(CINE, "a portrait", None, "", st)
        e = tiny_generator.model.weighted_embeds(pos, "")
        assert e["prompt_embeds"].shape == base["prompt_embeds"].shape
        assert e["pooled_prompt_embeds"].shape == base["pooled_prompt_embeds"].shape
        dists.append(float(torch.linalg.vector_norm(e["prompt_embeds"] - base["prompt_embeds"])))
    assert dists == sorted(dists) and dists[0] > 0, dists


def test_a_weighted_request_generates_and_reports_its_prompt(tiny_generator, tiny_settings):
    req = GenerationRequest.from_dict({"prompt": "a portrait", "style": "cinematic", "style_strength": 0.3,
                                       "seed": 3}, tiny_settings)
    res = tiny_generator.generate(req)
    m = res.metadata
    assert m["prompt_weighting"] == "compel" and m["style_strength"] == 0.3
    assert m["prompt"].startswith("a portrait (cinematic film still") and m["prompt"].endswith(")0.3")
    assert "(cartoon, lowres, oversaturated, deformed face)0.3" in m["negative_prompt"]
    plain = tiny_generator.generate(dataclasses.replace(req, style_strength=1.0)).metadata
    assert plain["prompt_weighting"] is None
    assert plain["prompt"] == "a portrait, cinematic film still, dramatic lighting, shallow depth of field, film grain"


@pytest.mark.parametrize("style, quality, expect", [
    ("film_noir", "balanced", {"guidance_scale": 7.0}),
    ("pixel_art", "balanced", {"steps": 20}),
    ("pixel_art", "high_fidelity", {}),               # an explicit quality choice keeps its steps
    ("corporate", "balanced", {"aspect_ratio": "4:5"}),
    ("photoreal", "balanced", {}),
])
def test_style_defaults_apply_where_the_request_leaves_them(tiny_generator, tiny_settings, style, quality, expect):
    req = GenerationRequest.from_dict({"prompt": "p", "style": style, "quality_mode": quality}, tiny_settings)
    plan = tiny_generator.model.plan(req)
    assert plan["style_defaults"] == expect
    if "aspect_ratio" in expect:
        assert plan["width"] < plan["height"]
        sized = GenerationRequest.from_dict({"prompt": "p", "style": style, "aspect_ratio": "1:1"}, tiny_settings)
        assert "aspect_ratio" not in tiny_generator.model.plan(sized)["style_defaults"]


@pytest.mark.parametrize("value, needle", [(1.5, "style_strength=1.5"), (-0.1, "style_strength=-0.1"),
                                           ("half", "style_strength='half'"), (True, "style_strength=True")])
def test_bad_style_strength_names_the_value(tiny_settings, value, needle):
    with pytest.raises(InvalidRequest) as e:
        GenerationRequest.from_dict({"prompt": "p", "style_strength": value}, tiny_settings)
    assert needle in e.value.message


def test_get_styles_lists_the_library_and_is_in_openapi(make_app):
    app = make_app()
    c = app.test_client()
    body = c.get("/styles").get_json()
    assert body["default_style"] == DEFAULT_STYLE
    names = [s["name"] for s in body["styles"]]
    assert names == list(style_library(Settings()))
    cine = next(s for s in body["styles"] if s["name"] == "corporate")
    assert "{prompt}" in cine["positive"] and cine["defaults"] == {"aspect_ratio": "4:5"}
    spec = c.get("/openapi.json").get_json()
    assert "/styles" in spec["paths"]
    assert spec["components"]["schemas"]["GenerateRequest"]["properties"]["style_strength"]["maximum"] == 1.0
