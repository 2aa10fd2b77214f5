"""Conversation turns per frame, in the records database (`conversation_turns`), so they survive a restart.

    >>> turns = ConversationStore(store.engine)
    >>> turns.add("cam-0-000012", operator="alice", question="Where?", answer="...", intent="position",
    ...           sources=[...], latency_ms=3.1)
    >>> [t.question for t in turns.history("cam-0-000012")]
    ['Where?']
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError

from storage.schema import as_utc, conversation_turns, naive_utc


@dataclass
class Turn:
    frame_id: str
    turn: int
    operator: str
    question: str
    answer: str
    intent: str
    sources: list[dict]
    latency_ms: float
    asked_at: datetime


class ConversationStore:
    def __init__(self, engine):
        self.engine = engine
        # one writer at a time in this process: SQLite lets one write transaction in, and a connection that
        # finds the database locked sleeps in SQLite's busy handler (steps of 10-100 ms), which was the p99
        # of fact answers with 8 operators asking at once; a lock hands over in microseconds
        self._write = threading.Lock()

    def history(self, frame_id: str) -> list[Turn]:
        """Every turn about a frame, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(conversation_turns).where(conversation_turns.c.frame_id == frame_id)
                                .order_by(conversation_turns.c.turn)).all()
        return [Turn(frame_id=r.frame_id, turn=r.turn, operator=r.operator, question=r.question, answer=r.answer,
                     intent=r.intent, sources=json.loads(r.sources), latency_ms=r.latency_ms,
                     asked_at=as_utc(r.asked_at)) for r in rows]

    def count(self, frame_id: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(conversation_turns)
                                    .where(conversation_turns.c.frame_id == frame_id)).scalar_one())

    def add(self, frame_id: str, *, operator: str, question: str, answer: str, intent: str, sources: list,
            latency_ms: float, asked_at: datetime | None = None) -> Turn:
        """Append a turn (numbered 1, 2, ...); two operators asking at once each get their own number."""
        asked_at = asked_at or datetime.now(UTC)
        plain = [asdict(s) if not isinstance(s, dict) else s for s in sources]
        for _ in range(5):
            try:
                with self._write, self.engine.begin() as conn:
                    last = conn.execute(select(func.max(conversation_turns.c.turn))
                                        .where(conversation_turns.c.frame_id == frame_id)).scalar()
                    number = (last or 0) + 1
                    conn.execute(insert(conversation_turns).values(
                        frame_id=frame_id, turn=number, operator=operator, question=question, answer=answer,
                        intent=intent, sources=json.dumps(plain), latency_ms=latency_ms,
                        asked_at=naive_utc(asked_at)))
                return Turn(frame_id, number, operator, question, answer, intent, plain, latency_ms, asked_at)
            except IntegrityError:
                continue   # another turn took this number first
        raise RuntimeError(f"could not store a conversation turn for {frame_id}")
