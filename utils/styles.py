"""The style library: prompt presets read from a data file (``styles/styles.json``; TWIN_STYLES_FILE).

Operators add a style by editing the file; the service reads it once at start-up and a broken file
stops start-up with the file, the line and (for a bad preset) the preset named. Each preset::

    "cinematic": {"positive": "{prompt}, cinematic film still, ...",   # exactly one {prompt}
                  "negative": "cartoon, lowres, ...",                   # added to the request's negative
                  "description": "...",                                 # optional, for clients
                  "steps": 30, "guidance_scale": 7.0, "aspect_ratio": "16:9"}   # optional defaults

``apply_style`` splits a template into the text before and after ``{prompt}``; ``style_strength`` below 1
weights only that style text (and the style's negative) through compel's prompt syntax, so the
caller's own words always keep full weight. Pure data and text: no torch, no diffusers.
"""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from utils.errors import ConfigError

PLACEHOLDER = "{prompt}"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_]{0,39}$")
MAX_TEXT = 600            # characters of one template or negative
MAX_STYLES = 200
_KEYS = {"positive", "negative", "description", "steps", "guidance_scale", "aspect_ratio"}


@dataclass(frozen=True)
class Style:
    name: str
    positive: str                  # template with exactly one {prompt}
    negative: str = ""
    description: str = ""
    steps: int | None = None
    guidance_scale: float | None = None
    aspect_ratio: str | None = None

    @property
    def prefix(self) -> str:
        return self.positive.split(PLACEHOLDER)[0]

    @property
    def suffix(self) -> str:
        return self.positive.split(PLACEHOLDER)[1]

    @property
    def defaults(self) -> dict[str, Any]:
        return {k: v for k, v in (("steps", self.steps), ("guidance_scale", self.guidance_scale),
                                  ("aspect_ratio", self.aspect_ratio)) if v is not None}

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "positive": self.positive,
                "negative": self.negative, "defaults": self.defaults}


def _line_of(text: str, name: str) -> int | None:
    m = re.search(r'"%s"\s*:' % re.escape(name), text)
    return text.count("\n", 0, m.start()) + 1 if m else None


def parse_styles(text: str, source: str, aspect_ratios: Sequence[str]) -> dict[str, Style]:
    """The presets in ``text`` (JSON), or ConfigError naming ``source``, the line and the preset."""
    def fail(msg: str, name: str | None = None) -> ConfigError:
        line = _line_of(text, name) if name is not None else None
        where = f"{source}, line {line}" if line else source
        return ConfigError(f"style library {where}: {msg}")

    raw = _styles_object(_load_json(text, source, fail), fail)
    return {name: _parse_style(name, p, aspect_ratios, fail) for name, p in raw.items()}


_Fail = Callable[..., ConfigError]


def _load_json(text: str, source: str, fail: _Fail) -> Any:
    """The parsed document; a key given twice is an error (json.loads would keep the last silently)."""
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for k, v in items:
            if k in seen:
                duplicates.append(k)
            seen[k] = v
        return seen
    try:
        data = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        raise ConfigError(f"style library {source}, line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None
    if duplicates:
        raise fail(f"preset or key {duplicates[0]!r} appears twice", duplicates[0])
    return data


def _styles_object(data: Any, fail: _Fail) -> dict[str, Any]:
    if not isinstance(data, dict) or not isinstance(data.get("styles"), dict):
        raise fail('the top level must be an object with a "styles" object')
    raw = data["styles"]
    if not raw:
        raise fail("no styles defined")
    if len(raw) > MAX_STYLES:
        raise fail(f"{len(raw)} styles; at most {MAX_STYLES}")
    return raw


def _parse_style(name: str, p: Any, aspect_ratios: Sequence[str], fail: _Fail) -> Style:
    if not NAME_RE.match(name):
        raise fail(f"style name {name!r} must be 1-40 of a-z, 0-9, _ (starting with a letter or digit)", name)
    if not isinstance(p, dict):
        raise fail(f"style {name!r} must be an object", name)
    unknown = sorted(set(p) - _KEYS)
    if unknown:
        raise fail(f"style {name!r}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_KEYS))}", name)
    pos, neg, desc = p.get("positive"), p.get("negative", ""), p.get("description", "")
    if not isinstance(pos, str) or pos.count(PLACEHOLDER) != 1:
        raise fail(f"style {name!r}: positive={pos!r} must be a string with exactly one {PLACEHOLDER}", name)
    if pos.replace(PLACEHOLDER, "").count("{") or pos.replace(PLACEHOLDER, "").count("}"):
        raise fail(f"style {name!r}: positive={pos!r} has a brace other than {PLACEHOLDER}", name)
    for key, val in (("positive", pos), ("negative", neg), ("description", desc)):
        if not isinstance(val, str):
            raise fail(f"style {name!r}: {key}={val!r} must be a string", name)
        if len(val) > MAX_TEXT:
            raise fail(f"style {name!r}: {key} has {len(val)} characters; at most {MAX_TEXT}", name)
        if any(ord(c) < 32 or c in "()[]\\\"" for c in val if key != "description"):
            # These characters carry meaning in compel's weighting syntax.
            raise fail(f"style {name!r}: {key}={val!r} has a control character or one of ()[]\\\"", name)
    steps, cfg, ar = p.get("steps"), p.get("guidance_scale"), p.get("aspect_ratio")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 100):
        raise fail(f"style {name!r}: steps={steps!r} is not an integer between 1 and 100", name)
    if cfg is not None and (isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not 0 <= cfg <= 30):
        raise fail(f"style {name!r}: guidance_scale={cfg!r} is not a number between 0 and 30", name)
    if ar is not None and ar not in aspect_ratios:
        raise fail(f"style {name!r}: aspect_ratio={ar!r} is not one of {', '.join(aspect_ratios)}", name)
    return Style(name=name, positive=pos, negative=neg.strip(), description=desc, steps=steps,
                 guidance_scale=None if cfg is None else float(cfg), aspect_ratio=ar)


_cache: dict[str, dict[str, Style]] = {}
_cache_lock = threading.Lock()


def load_styles(path: Path, aspect_ratios: Sequence[str]) -> dict[str, Style]:
    """The library at ``path``, read once per process (start-up reads it first, so a broken file stops it)."""
    key = str(Path(path).resolve())
    with _cache_lock:
        if key not in _cache:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"style library {path}: cannot be read: {e}") from None
            _cache[key] = parse_styles(text, str(path), aspect_ratios)
        return _cache[key]


# --- prompt text -----------------------------------------------------------------------------------
_WEIGHT_SUFFIX = re.compile(r"(?<=\S)([+-]+)(?=\s|$)")


def escape_weighting(text: str) -> str:
    """User text made literal for compel's parser: ( ) " are escaped, and a word ending in + or -
    (compel's up/down-weight marks, e.g. "50+") gets a space so the sign stays text."""
    # A backslash is left alone: compel keeps it as text (it is no escape for itself).
    text = re.sub(r'([()"])', r"\\\1", text)
    return _WEIGHT_SUFFIX.sub(r" \1", text)


def _weighted(text: str, weight: float) -> str:
    text = text.strip(" ,")
    return f"({text}){weight:.3g}" if text else ""


def apply_style(style: Style, prompt: str, user_negative: str | None, base_negative: str = "",
                strength: float = 1.0) -> tuple[str, str, bool]:
    """(positive, negative, weighted): the styled prompt texts; the negative is the caller's, then the
    style's, then the base negative. With strength 1 they are plain text (the template filled in); below 1
    they are compel syntax in which only the style's text is weighted by ``strength`` (the caller's words
    and the base negative stay literal, at weight 1)."""
    has_text = bool((style.prefix + style.suffix).strip(" ,") or style.negative)
    if strength >= 1.0 or not has_text:  # nothing to weight: plain text, no compel pass
        positive = style.positive.replace(PLACEHOLDER, prompt)
        negative = ", ".join(x for x in (user_negative, style.negative, base_negative) if x)
        return positive, negative, False
    pre, suf = _weighted(style.prefix, strength), _weighted(style.suffix, strength)
    positive = " ".join(x for x in (pre, escape_weighting(prompt), suf) if x)
    negative = ", ".join(x for x in (escape_weighting(user_negative or ""), _weighted(style.negative, strength),
                                     escape_weighting(base_negative)) if x)
    return positive, negative, True


def catalogue(styles: Mapping[str, Style]) -> list[dict[str, Any]]:
    return [s.to_json() for s in styles.values()]
