"""The persona / attribute prompt builder (utils/prompts.py): tables for the text, the order, the
token budget and every bad input; then the same through GenerationRequest and the tiny generator."""
from __future__ import annotations

import pytest

from generate_twin import GenerationRequest
from utils.errors import InvalidRequest
from utils.prompts import PERSONA_NEGATIVE, build_prompt, check_attributes, check_persona


def words(text: str) -> int:
    return len(text.replace(",", " ").split())


FULL_PERSONA = {"name": "Ana", "age": 34, "traits": ["confident", "warm"]}
FULL_ATTRS = {"gender": "female", "ethnicity": "Korean", "hair": "short curly black", "eyes": "green",
              "skin_tone": "olive", "outfit": "a navy suit", "expression": "smiling", "background": "city street"}


@pytest.mark.parametrize("persona, attributes, text", [
    (None, None, "in a forest"),                                          # nothing to build: prompt unchanged
    ({}, {}, "in a forest"),
    ({"age": 34}, {"gender": "female"}, "a 34-year-old woman, in a forest"),
    ({"age": 80}, {"gender": "male"}, "an 80-year-old man, in a forest"),
    ({}, {"age_group": "senior", "gender": "non_binary"}, "an elderly person, in a forest"),
    ({"age": 40}, {"age_group": "senior"}, "a 40-year-old person, in a forest"),      # the exact age wins
    ({}, {"hair": "short black hair", "eyes": "blue eyes"}, "a person, blue eyes, short black hair, in a forest"),
    ({}, {"expression": "neutral", "outfit": "wearing a red coat"},
     "a person, in a forest, neutral expression, wearing a red coat"),
    (FULL_PERSONA, FULL_ATTRS,
     "a 34-year-old Korean woman, olive skin, green eyes, short curly black hair, in a forest, smiling, "
     "wearing a navy suit, city street background, confident, warm, named Ana"),
])
def test_terms_read_identity_first(persona, attributes, text):
    assert build_prompt("in a forest", persona, attributes).text == text


@pytest.mark.parametrize("budget, kept_last, dropped", [
    (100, "name", []),
    (26, "traits", ["named Ana"]),
    (24, "background", ["named Ana", "confident, warm"]),
    (18, "expression", ["named Ana", "confident, warm", "city street background", "wearing a navy suit"]),
    (12, "prompt", ["named Ana", "confident, warm", "city street background", "wearing a navy suit", "smiling",
                  "short curly black hair"]),
    # Subject and prompt alone are over the budget: everything optional goes, and the result says so.
    (3, "prompt", ["named Ana", "confident, warm", "city street background", "wearing a navy suit", "smiling",
                   "short curly black hair", "green eyes", "olive skin"]),
])
def test_the_budget_drops_the_lowest_priority_terms_first(budget, kept_last, dropped):
    b = build_prompt("in a forest", FULL_PERSONA, FULL_ATTRS, count_tokens=words, max_tokens=budget)
    assert [t for _, t in b.dropped] == dropped
    assert b.terms[-1][0] == kept_last and b.terms[0][0] == "subject"
    assert ("prompt", "in a forest") in b.terms
    assert b.tokens == words(b.text)
    assert b.over_budget == (b.tokens > budget)
    assert b.to_json()["dropped"] == dropped and b.negative == PERSONA_NEGATIVE


@pytest.mark.parametrize("check, value, needle", [
    (check_persona, {"nick": "x"}, "unknown persona field(s): nick"),
    (check_persona, {"name": 5}, "persona.name=5"),
    (check_persona, {"name": "   "}, "persona.name='   '"),
    (check_persona, {"name": "x" * 61}, "persona.name has 61 characters"),
    (check_persona, {"name": "An\x07a"}, "persona.name contains the control character U+0007 at position 2"),
    (check_persona, {"name": "\ud800"}, "unpaired surrogate U+D800"),
    (check_persona, {"age": 17}, "persona.age=17"),
    (check_persona, {"age": 101}, "persona.age=101"),
    (check_persona, {"age": "34"}, "persona.age='34'"),
    (check_persona, {"age": True}, "persona.age=True"),
    (check_persona, {"traits": "kind"}, "persona.traits='kind'"),
    (check_persona, {"traits": ["a"] * 9}, "persona.traits has 9 entries"),
    (check_persona, {"traits": ["kind", 3]}, "persona.traits[1]=3"),
    (check_persona, {"traits": ["kind", "x" * 41]}, "persona.traits[1] has 41 characters"),
    (check_attributes, {"colour": "red"}, "unknown attributes field(s): colour"),
    (check_attributes, {"gender": "woman"}, "attributes.gender='woman' is not one of female, male, non_binary"),
    (check_attributes, {"age_group": "child"}, "attributes.age_group='child'"),
    (check_attributes, {"skin_tone": 3}, "attributes.skin_tone=3"),
    (check_attributes, {"expression": "angry"}, "attributes.expression='angry'"),
    (check_attributes, {"hair": ["black"]}, "attributes.hair=['black']"),
    (check_attributes, {"outfit": "x" * 81}, "attributes.outfit has 81 characters"),
    (check_attributes, {"background": "a\x1bb"}, "attributes.background contains the control character U+001B"),
])
def test_bad_persona_and_attributes_name_the_value(check, value, needle):
    with pytest.raises(InvalidRequest) as e:
        check(value)
    assert needle in e.value.message


def test_values_are_normalised():
    assert check_persona({"name": "  Ana  Lee ", "traits": [" warm "]}) == {"name": "Ana Lee", "traits": ["warm"]}
    assert check_attributes({"hair": "black\thair", "gender": None}) == {"hair": "black hair"}


@pytest.mark.parametrize("payload, needle", [
    ({"persona": "Ana"}, "persona='Ana' is not a JSON object"),
    ({"attributes": ["female"]}, "attributes=['female'] is not a JSON object"),
    ({"persona": {"age": 12}}, "persona.age=12"),
    ({"attributes": {"eyes": "x" * 50}}, "attributes.eyes has 50 characters"),
])
def test_the_request_refuses_bad_objects(tiny_settings, payload, needle):
    with pytest.raises(InvalidRequest) as e:
        GenerationRequest.from_dict({"prompt": "p", **payload}, tiny_settings)
    assert needle in e.value.message


def test_the_generator_fits_the_window_with_the_real_tokenizer(tiny_generator, tiny_settings):
    """The tiny tokenizer is near character-level, so a full persona cannot fit: the job's metadata says
    which terms were dropped, and the final prompt (+ the persona negative) is what the pipeline got."""
    req = GenerationRequest.from_dict({"prompt": "in a forest", "style": "none", "seed": 1,
                                       "persona": FULL_PERSONA, "attributes": FULL_ATTRS}, tiny_settings)
    m = tiny_generator.generate(req).metadata
    pb = m["prompt_builder"]
    assert pb["dropped"] and pb["tokens"] <= 75 and not pb["over_budget"]
    assert m["prompt"] == pb["text"] and m["prompt"].startswith("a 34-year-old Korean woman")
    assert "in a forest" in m["prompt"] and "named Ana" not in m["prompt"]
    assert tiny_generator.model.count_tokens(m["prompt"]) <= 75
    assert PERSONA_NEGATIVE in m["negative_prompt"]
    plain = tiny_generator.generate(GenerationRequest.from_dict({"prompt": "in a forest", "style": "none"},
                                                                tiny_settings)).metadata
    assert plain["prompt"] == "in a forest" and plain["prompt_builder"] is None


def test_the_job_json_shows_the_final_prompt(make_app, service_settings, tiny_generator, face_service):
    import time
    from tests.helpers.http import upload_token
    from tests.photos import selfie_set
    app = make_app(service_settings.replace(max_image_side=128), generator=tiny_generator, faces=face_service)
    c = app.test_client()
    token = upload_token(c, selfie_set(1))
    r = c.post("/generate", headers=token, json={"prompt": "in a forest", "style": "none", "width": 64, "height": 64,
                                                 "persona": {"age": 34}, "attributes": {"gender": "female"}})
    assert r.status_code == 202, r.get_json()
    job = r.get_json()
    assert job["request"]["persona"] == {"age": 34} and job["request"]["attributes"] == {"gender": "female"}
    deadline = time.time() + 60
    while job["status"] not in ("succeeded", "failed"):
        assert time.time() < deadline
        time.sleep(0.05)
        job = c.get(job["status_url"], headers=token).get_json()
    assert job["status"] == "succeeded", job["error"]
    assert job["metadata"]["prompt"] == "a 34-year-old woman, in a forest"
    assert PERSONA_NEGATIVE in job["metadata"]["negative_prompt"]
    bad = c.post("/generate", headers=token, json={"prompt": "p", "attributes": {"gender": "robot"}})
    assert bad.status_code == 400 and "attributes.gender='robot'" in bad.get_json()["error"]["message"]
