"""Reading a Server-Sent Events body (GET /events/<job_id>)."""
from __future__ import annotations

import json


def parse_sse(text: str) -> tuple[list[dict], int]:
    """(events as {"id", "event", "data"}, heartbeat comments) from a text/event-stream body."""
    events, beats = [], 0
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        if block.startswith(": heartbeat"):
            beats += 1
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        if "event" in fields:
            events.append({"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])})
    return events, beats
