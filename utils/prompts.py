"""Persona / attribute prompt builder: pure data + one function, no engine.

    persona    = {"name": "Ana", "age": 34, "traits": ["confident", "warm"]}
    attributes = {"gender": "female", "hair": "short curly black hair", "expression": "smiling", ...}
    built = build_prompt("a portrait in a forest", persona, attributes, count_tokens=tokens, max_tokens=60)
    built.text        # "a 34-year-old woman, green eyes, short curly black hair, a portrait in a forest, smiling, ..."
    built.dropped     # the terms left out to stay inside the CLIP window, lowest priority first

Order = priority: CLIP weighs early tokens most and truncates at 77, so the person's identity (age,
gender, ethnicity, skin, eyes, hair) comes first, then the caller's prompt, then what may change from
picture to picture (expression, outfit, background, traits, name). When the text does not fit, terms are
dropped from the end; the subject and the caller's prompt are never dropped.

The checks (``check_persona`` / ``check_attributes``) are the ``check=`` of the request field rows:
enumerations where the set is small, length limits, and the prompt text rules (no control characters,
no unpaired surrogates) with the offending key and value named.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from utils.errors import InvalidRequest

# Tab, newline and carriage return are ordinary in pasted prompts; every other control character is not.
_ALLOWED_CONTROLS = {"\t", "\n", "\r"}


def check_text(name: str, text: str) -> None:
    """The prompt text rule: control characters and unpaired surrogates are refused (position named,
    the text itself never echoed: it may be long or hostile)."""
    for pos, ch in enumerate(text):
        cat = unicodedata.category(ch)
        if cat == "Cs":
            raise InvalidRequest(f"{name} contains an unpaired surrogate U+{ord(ch):04X} at position {pos}; "
                                 "send valid UTF-8 text")
        if cat == "Cc" and ch not in _ALLOWED_CONTROLS:
            raise InvalidRequest(f"{name} contains the control character U+{ord(ch):04X} at position {pos}; "
                                 "remove control characters")


# --- the value sets ---------------------------------------------------------------------------------
GENDERS = {"female": "woman", "male": "man", "non_binary": "person"}
# Adults only: a digital twin of a minor is out of scope (and the age is what the picture is steered to).
AGE_GROUPS = {"young_adult": "young adult", "adult": "adult", "middle_aged": "middle-aged", "senior": "elderly"}
SKIN_TONES = ("fair", "light", "medium", "olive", "tan", "brown", "dark")
EXPRESSIONS = ("neutral", "smiling", "laughing", "serious", "confident", "thoughtful", "surprised", "calm")
MIN_AGE, MAX_AGE = 18, 100
MAX_TRAITS = 8

# Free-text attributes: (max characters, how the value reads in the prompt).
TEXT_ATTRIBUTES: dict[str, tuple[int, str]] = {
    "ethnicity": (40, "{v}"),
    "hair": (60, "{v} hair"),
    "eyes": (40, "{v} eyes"),
    "outfit": (80, "wearing {v}"),
    "background": (80, "{v} background"),
}
ENUM_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "gender": tuple(GENDERS), "age_group": tuple(AGE_GROUPS), "skin_tone": SKIN_TONES, "expression": EXPRESSIONS,
}
ATTRIBUTE_KEYS = ("gender", "age_group", "ethnicity", "hair", "eyes", "skin_tone", "outfit", "expression", "background")
PERSONA_KEYS = ("name", "age", "traits")
NAME_MAX, TRAIT_MAX = 60, 40

# Priority order of the optional terms (first kept longest). The subject and the prompt are not in it.
TERM_ORDER = ("skin_tone", "eyes", "hair", "prompt", "expression", "outfit", "background", "traits", "name")
# Negative terms that protect a single, consistent identity when a persona is described.
PERSONA_NEGATIVE = "multiple people, extra faces, different person, asymmetric eyes"


def _text(key: str, value: Any, max_len: int) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{key}={value!r} must be a string")
    v = " ".join(value.split())
    if not v:
        raise InvalidRequest(f"{key}={value!r} must be a non-empty string")
    if len(v) > max_len:
        raise InvalidRequest(f"{key} has {len(v)} characters; at most {max_len} are allowed")
    check_text(key, v)
    return v


def _keys(kind: str, value: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(map(str, value)) - set(allowed))
    if unknown:
        raise InvalidRequest(f"unknown {kind} field(s): {', '.join(unknown)}; allowed: {', '.join(allowed)}")


def check_persona(value: Mapping[str, Any], settings: Any = None) -> dict[str, Any]:
    _keys("persona", value, PERSONA_KEYS)
    out: dict[str, Any] = {}
    if value.get("name") is not None:
        out["name"] = _text("persona.name", value["name"], NAME_MAX)
    age = value.get("age")
    if age is not None:
        if isinstance(age, bool) or not isinstance(age, int) or not MIN_AGE <= age <= MAX_AGE:
            raise InvalidRequest(f"persona.age={age!r} is not an integer between {MIN_AGE} and {MAX_AGE}")
        out["age"] = age
    traits = value.get("traits")
    if traits is not None:
        if not isinstance(traits, list):
            raise InvalidRequest(f"persona.traits={traits!r} is not a list of strings")
        if len(traits) > MAX_TRAITS:
            raise InvalidRequest(f"persona.traits has {len(traits)} entries; at most {MAX_TRAITS} are allowed")
        out["traits"] = [_text(f"persona.traits[{i}]", t, TRAIT_MAX) for i, t in enumerate(traits)]
    return out


def check_attributes(value: Mapping[str, Any], settings: Any = None) -> dict[str, Any]:
    _keys("attributes", value, ATTRIBUTE_KEYS)
    out: dict[str, Any] = {}
    for key in ATTRIBUTE_KEYS:
        v = value.get(key)
        if v is None:
            continue
        if key in ENUM_ATTRIBUTES:
            if not isinstance(v, str) or v not in ENUM_ATTRIBUTES[key]:
                raise InvalidRequest(f"attributes.{key}={v!r} is not one of {', '.join(ENUM_ATTRIBUTES[key])}")
            out[key] = v
        else:
            out[key] = _text(f"attributes.{key}", v, TEXT_ATTRIBUTES[key][0])
    return out


def persona_schema() -> dict[str, Any]:
    text = {"type": "string", "minLength": 1}
    return {"additionalProperties": False, "properties": {
        "name": {**text, "maxLength": NAME_MAX, "nullable": True},
        "age": {"type": "integer", "minimum": MIN_AGE, "maximum": MAX_AGE, "nullable": True},
        "traits": {"type": "array", "maxItems": MAX_TRAITS, "nullable": True,
                   "items": {**text, "maxLength": TRAIT_MAX}}}}


def attributes_schema() -> dict[str, Any]:
    props: dict[str, Any] = {}
    for key in ATTRIBUTE_KEYS:
        if key in ENUM_ATTRIBUTES:
            props[key] = {"type": "string", "enum": list(ENUM_ATTRIBUTES[key]), "nullable": True}
        else:
            props[key] = {"type": "string", "minLength": 1, "maxLength": TEXT_ATTRIBUTES[key][0], "nullable": True}
    return {"additionalProperties": False, "properties": props}


# --- the builder ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuiltPrompt:
    text: str
    terms: list[tuple[str, str]]                        # (key, text) kept, in prompt order
    dropped: list[tuple[str, str]] = field(default_factory=list)
    negative: str = ""                                  # added to the negative prompt
    tokens: int | None = None                           # of text, by count_tokens (None: not counted)
    over_budget: bool = False                           # subject + prompt alone exceed max_tokens

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "terms": [k for k, _ in self.terms], "dropped": [t for _, t in self.dropped],
                "tokens": self.tokens, "over_budget": self.over_budget}


def subject(persona: Mapping[str, Any], attributes: Mapping[str, Any]) -> str:
    """'a 34-year-old Korean woman', 'a middle-aged man', 'a person'."""
    words = []
    if persona.get("age") is not None:
        words.append(f"{persona['age']}-year-old")
    elif attributes.get("age_group"):
        words.append(AGE_GROUPS[attributes["age_group"]])
    if attributes.get("ethnicity"):
        words.append(attributes["ethnicity"])
    words.append(GENDERS.get(attributes.get("gender") or "", "person"))
    first = words[0]
    # "an 18-year-old", "an 80-year-old", "an elderly ...": the sound, not the letter, picks the article.
    article = "an" if first[:1].lower() in "aeiou8" or first.startswith("18-") else "a"
    return f"{article} {' '.join(words)}"


def _optional_terms(prompt: str, persona: Mapping[str, Any], attributes: Mapping[str, Any]) -> list[tuple[str, str]]:
    terms: list[tuple[str, str]] = []
    for key in TERM_ORDER:
        if key == "prompt":
            terms.append(("prompt", prompt))
        elif key == "skin_tone" and attributes.get("skin_tone"):
            terms.append((key, f"{attributes['skin_tone']} skin"))
        elif key == "expression" and attributes.get("expression") and attributes["expression"] != "neutral":
            terms.append((key, attributes["expression"]))
        elif key == "expression" and attributes.get("expression") == "neutral":
            terms.append((key, "neutral expression"))
        elif key in TEXT_ATTRIBUTES and attributes.get(key):
            v, tpl = attributes[key], TEXT_ATTRIBUTES[key][1]
            # "short black hair" stays as given (no "hair hair"); "short black" reads "short black hair".
            word = tpl.replace("{v}", "").strip()
            given = word and (v.lower().endswith(" " + word) or v.lower() == word or
                              (word == "wearing" and v.lower().startswith("wearing ")))
            terms.append((key, v if given else tpl.format(v=v)))
        elif key == "traits" and persona.get("traits"):
            terms.append((key, ", ".join(persona["traits"])))
        elif key == "name" and persona.get("name"):
            terms.append((key, f"named {persona['name']}"))
    return terms


def build_prompt(prompt: str, persona: Mapping[str, Any] | None = None, attributes: Mapping[str, Any] | None = None,
                 *, count_tokens: Callable[[str], int] | None = None, max_tokens: int = 75,
                 twin_caption: str | None = None) -> BuiltPrompt:
    """The caller's prompt with the persona / attributes, identity first, inside ``max_tokens`` tokens
    (as counted by ``count_tokens``: the real tokenizer, without its start/end tokens). ``twin_caption``: a
    trained twin LoRA's caption ("photo of <token> person"), put first and never dropped: the LoRA learned the
    person under that token. Without persona, attributes and twin the prompt is returned unchanged."""
    persona, attributes = persona or {}, attributes or {}
    twin = [("twin", twin_caption)] if twin_caption else []
    if not persona and not attributes:
        terms = twin + [("prompt", prompt)]
        text = ", ".join(t for _, t in terms)
        return BuiltPrompt(text=text, terms=terms, tokens=count_tokens(text) if count_tokens else None)
    terms = twin + [("subject", subject(persona, attributes))] + _optional_terms(prompt, persona, attributes)

    def join(ts: list[tuple[str, str]]) -> str:
        return ", ".join(t for _, t in ts)
    dropped: list[tuple[str, str]] = []
    if count_tokens is not None:
        while count_tokens(join(terms)) > max_tokens:
            # Drop the lowest-priority term that may go (from the end; never the subject or the prompt).
            idx = next((i for i in range(len(terms) - 1, -1, -1)
                        if terms[i][0] not in ("twin", "subject", "prompt")), None)
            if idx is None:
                break
            dropped.append(terms.pop(idx))
    text = join(terms)
    tokens = count_tokens(text) if count_tokens else None
    return BuiltPrompt(text=text, terms=terms, dropped=dropped, negative=PERSONA_NEGATIVE, tokens=tokens,
                       over_budget=tokens is not None and tokens > max_tokens)
