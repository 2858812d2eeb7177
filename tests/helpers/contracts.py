"""Checking an object against a contract (utils/contracts.py): its methods and their signatures."""
from __future__ import annotations

import inspect


def protocol_methods(proto) -> dict[str, inspect.Signature]:
    """The protocol's methods (not its properties or data members) and their declared signatures."""
    out = {}
    for name in sorted(getattr(proto, "__protocol_attrs__", None) or proto.__dict__):
        member = inspect.getattr_static(proto, name, None)
        if inspect.isfunction(member) and not name.startswith("_"):
            out[name] = inspect.signature(member)
    return out


def incompatibilities(declared: inspect.Signature, impl) -> list[str]:
    """How a bound method ``impl`` fails to accept every call the protocol's signature allows."""
    want = [p for p in declared.parameters.values() if p.name != "self"]
    have = inspect.signature(impl).parameters
    problems = []
    positional = [p for p in have.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    any_keyword = any(q.kind == q.VAR_KEYWORD for q in have.values())
    for i, p in enumerate(want):
        q = have.get(p.name)
        if q is None and p.kind == p.KEYWORD_ONLY and any_keyword:
            continue   # taken by the implementation's **kwargs
        if q is None:
            problems.append(f"no parameter {p.name!r}")
            continue
        if p.kind == p.POSITIONAL_OR_KEYWORD and (i >= len(positional) or positional[i].name != p.name):
            problems.append(f"{p.name!r} is not positional parameter {i + 1}")
        if p.kind == p.KEYWORD_ONLY and q.kind not in (q.KEYWORD_ONLY, q.POSITIONAL_OR_KEYWORD):
            problems.append(f"{p.name!r} cannot be passed by keyword")
        if p.default is not p.empty and q.default is p.empty:
            problems.append(f"{p.name!r} is optional in the contract but required here")
    for q in have.values():  # anything beyond the contract must be optional
        if q.name not in {p.name for p in want} and q.default is q.empty and q.kind not in (q.VAR_POSITIONAL,
                                                                                            q.VAR_KEYWORD):
            problems.append(f"extra required parameter {q.name!r}")
    return problems


def protocol_incompatibilities(proto, impl) -> dict[str, list[str]]:
    """{method: problems} for every method of ``proto`` that ``impl`` lacks or cannot be called as declared."""
    out = {}
    for name, sig in protocol_methods(proto).items():
        member = getattr(impl, name, None)
        problems = ["missing"] if member is None else incompatibilities(sig, member)
        if problems:
            out[name] = problems
    return out
