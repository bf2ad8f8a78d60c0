"""Live sessions: one `CasaStream` each (its `CasaCache` bounded by a `TextBudget`) kept between frames, a cap on
their number and an idle expiry, so server memory is bounded by `max_sessions` times one session's bounded cache."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from ..streaming import CasaStream, TextBudget, cache_nbytes
from .chat import ServeLimits
from .errors import ApiError


@dataclass
class Session:
    """A stream, its question and answer length, and the lock that keeps its frames in order."""

    id: str
    stream: CasaStream
    question: str
    max_tokens: int
    frames: int = 0
    turns: int = 0
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def state(self, ttl_s: float) -> dict:
        idle = time.monotonic() - self.last_used
        budget = self.stream.text_budget
        return {
            "id": self.id,
            "object": "session",
            "frames": self.frames,
            "turns": self.turns,
            "cache_tokens": self.stream.cache.get_seq_length(),
            "cache_bytes": cache_nbytes(self.stream.cache),
            "evicted_tokens": self.stream.evicted_tokens,
            "sink_tokens": budget.sink_tokens,
            "window_tokens": budget.window_tokens,
            "question": self.question,
            "max_tokens": self.max_tokens,
            "idle_s": round(idle, 3),
            "expires_in_s": round(max(ttl_s - idle, 0.0), 3),
        }


class SessionStore:
    """Sessions by id: create (429 over the cap), get (404 when unknown or expired), delete, and expiry sweeps."""

    def __init__(self, limits: ServeLimits):
        self.limits = limits
        self.sessions: dict[str, Session] = {}

    def create(self, stream: CasaStream, question: str, max_tokens: int) -> Session:
        self.expire()
        if len(self.sessions) >= self.limits.max_sessions:
            raise ApiError(
                429,
                f"too many live sessions ({self.limits.max_sessions}, the server's --max-sessions): delete one or "
                f"wait for idle ones to expire ({self.limits.session_ttl_s:g} s)",
                code="too_many_sessions",
            )
        session = Session(f"sess-{uuid.uuid4().hex}", stream, question, max_tokens)
        self.sessions[session.id] = session
        return session

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise ApiError(404, f"no session {session_id!r} (unknown, deleted or expired)", "session_id")
        session.last_used = time.monotonic()
        return session

    def delete(self, session_id: str) -> None:
        self.get(session_id)
        del self.sessions[session_id]

    def expire(self) -> list[str]:
        """Drop sessions idle for longer than the TTL (never one with a frame in flight)."""
        now = time.monotonic()
        gone = [
            s.id
            for s in self.sessions.values()
            if now - s.last_used > self.limits.session_ttl_s and not s.lock.locked()
        ]
        for session_id in gone:
            del self.sessions[session_id]
        return gone

    def totals(self) -> dict:
        return {
            "sessions": len(self.sessions),
            "max_sessions": self.limits.max_sessions,
            "cache_bytes": sum(cache_nbytes(s.stream.cache) for s in self.sessions.values()),
        }


def new_stream(engine, system: str | None, question: str, max_tokens: int, budget: TextBudget) -> CasaStream:
    """A session's stream: the processor's chat template writes its turns (system prompt once, then per frame a user
    message asking `question` or the frame's own text), as it does a chat request's; raw text without a template."""
    return CasaStream(
        engine.model,
        engine.processor,
        system=system,
        prompt=question,
        max_new_tokens=max_tokens,
        text_budget=budget,
    )
