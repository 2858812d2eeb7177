"""The explicit-term list (utils/safety/terms.py, safety/terms.json): what it refuses, through the usual
disguises; what it lets through (words that merely contain a term); the 400 it raises; and a broken
file stopping start-up with the line."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from utils.config import Settings
from utils.errors import ConfigError, PromptRefused
from utils.safety import terms as tm

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def terms() -> tm.TermList:
    return tm.load_terms(Settings().resolved_safety_terms_file)


REFUSED = [
    ("portrait of her, nude", "nude"),
    ("NUDE beach photo", "nude"),
    ("nüde", "nude"),                               # diacritics
    ("ｎｕｄｅ", "nude"),                            # full-width letters
    ("nu\u200bde", "nude"),                         # zero-width space
    ("nu\u00adde", "nude"),                         # soft hyphen
    ("n u d e", "nude"),                            # spaced letters
    ("n.u.d.e at the beach", "nude"),
    ("a n-u-d-e photo", "nude"),
    ("ΝUDΕ", "nude"),                               # Greek capitals
    ("nudе", "nude"),                               # Cyrillic e
    ("p0rn", "porn*"),                              # leet
    ("pornographic shoot", "porn*"),                # wildcard
    ("s3x tape", "sex"),
    ("$ex scene", "sex"),
    ("topless!", "topless"),
    ("a blow job", "blow job"),                     # two words
    ("blowjob", "blowjob"),
    ("without any clothes on", "without any clothes"),
    ("him, naked, in the rain", "naked"),
    ("the rapist", "rapist"),
    ("masturbating", "masturbat*"),
    ("loli style", "loli"),
    ("Erotica cover", "erotic*"),
]


@pytest.mark.parametrize("text,term", REFUSED, ids=[t for t, _ in REFUSED])
def test_refused(terms, text, term):
    found = terms.match(text)
    assert found is not None and found.text == term


ALLOWED = [
    "portrait in Essex, soft light",
    "cocktail party in Sussex",
    "Middlesex county cricket",
    "data analysis on a whiteboard",
    "a therapist in her office",
    "Scunthorpe United fan",
    "bunch of grapes, still life",
    "graduated cum laude",
    "brass sextant on a ship",
    "reading Dickens by the fire",
    "classic assassin movie poster",
    "nudge the camera left",
    "3d render, 8k, 1080p, 4k",
    "sexy",                                         # suggestive, not explicit: kept out of the list
    "woman in a red swimsuit on the beach",
    "man in a tuxedo, bokeh",
    "astronaut portrait, NASA, 85mm",
    "straße in Berlin, naïve painting",
    "a b c d e",                                    # spaced letters that spell nothing
    "",
]


@pytest.mark.parametrize("text", ALLOWED)
def test_allowed(terms, text):
    assert terms.match(text) is None


def test_every_shipped_style_passes(terms):
    styles = json.loads((REPO / "styles" / "styles.json").read_text())["styles"]
    refused = {name: terms.check({"style": style}) for name, style in styles.items()}
    assert {k: v for k, v in refused.items() if v} == {}


def test_every_term_refuses_itself(terms):
    """A term the normaliser would change (capital, accent, digit) could never match: the loader refuses
    those, so every term in the file matches its own text."""
    for term in terms.terms:
        assert terms.match(term.text.rstrip("*") + ("ally" if term.prefix else "")) is not None, term


def test_check_names_the_field_and_skips_the_negative_prompt(terms):
    assert terms.check({"prompt": "portrait", "negative_prompt": "nsfw, nude, naked"}) is None
    found = terms.check({"prompt": "portrait", "persona": {"traits": ["kind", "naked"]}, "style": "photo"})
    assert (found.field, found.term, found.group) == ("persona.traits[1]", "naked", "nudity")
    assert terms.check({"prompt": None, "style": {"positive": "{prompt}, topless"}}).field == "style.positive"


def test_refusal_is_a_400_naming_the_term(terms):
    error = terms.check({"prompt": "a p0rnographic photo"}).error()
    assert isinstance(error, PromptRefused)
    assert (error.code, error.http_status) == ("prompt_refused", 400)
    assert "'porn'" in error.message and "prompt" in error.message and "negative_prompt" in error.message
    assert error.to_dict()["details"] == {"field": "prompt", "term": "porn", "group": "sexual acts and content"}


def test_shipped_list_loads_once(terms):
    assert len(terms) > 80
    assert tm.load_terms(Settings().resolved_safety_terms_file) is terms


def _file(terms_obj, version=1) -> str:
    return json.dumps({"version": version, "about": "x", "terms": terms_obj}, indent=2)


BROKEN = [
    ("not JSON", '{\n  "version": 1,\n  "terms": {\n    "a": ["nude",]\n  }\n}', "line 4", "invalid JSON"),
    ("wrong version", _file({"a": ["nude"]}, version=2), None, '"version": 1'),
    ("capital letter", _file({"a": ["nude", "Naked"]}), "line 7", "'Naked' is not lower-case"),
    ("digit", _file({"a": ["nude", "s3x"]}), "line 7", "'s3x'"),
    ("double space", _file({"a": ["blow  job"]}), "line 6", "single spaces"),
    ("short wildcard stem", _file({"a": ["por*"]}), "line 6", "at least 4 letters"),
    ("duplicate", _file({"a": ["nude"], "b": ["naked", "nude"]}), "line 10", "appears twice (also in group 'a')"),
    ("empty group", _file({"a": ["nude"], "b": []}), "line 8", "non-empty list"),
    ("not a string", _file({"a": ["nude", 3]}), "line 5", "3 is not a string"),
]


@pytest.mark.parametrize("case,text,line,message", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_file_names_the_line(tmp_path, case, text, line, message):
    path = tmp_path / "terms.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        tm.load_terms(path)
    assert message in err.value.message and str(path) in err.value.message
    if line:
        assert re.search(f", {line}[: ]", err.value.message), err.value.message


def test_unreadable_file_stops_start_up(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        tm.load_terms(tmp_path / "absent.json")


def test_setting_points_at_another_file(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(_file({"house rules": ["spaghetti"]}))
    s = Settings.from_env({"TWIN_SAFETY_TERMS_FILE": str(path)})
    own = tm.load_terms(s.resolved_safety_terms_file)
    assert own.match("Spaghetti dinner").text == "spaghetti" and own.match("nude") is None
