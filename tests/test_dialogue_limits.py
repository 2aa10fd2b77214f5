"""The dialogue service's limits (issue 25), on the real app under a real uvicorn, against the session's broker
and a real records database (SQLite in tmp) written by the real `RecordStore`:

- bodies: a 30 MB body is refused (413) before it is read, a chunked body past its route's cap gets 413, a
  caller without a token gets 401 whatever its body (huge, chunked, not JSON);
- SSE: streams per token and in total are capped (429), and a closed stream frees its slot;
- connections: a half-sent request (or none at all) is closed within the header timeout;
- masks: garbage, 3-channel, wrong-shape and oversized-dimension masks get 422, a good one 202; labels past
  the operator's hourly quota get 429; training's decoder refuses what the API refuses;
- dates: out-of-range `since` / `until` and "the last 99999999 days" get 422, never 500;
- free-form questions: past the LLM queue, 503 with Retry-After, while records and fact answers are served.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import cv2
import httpx
import numpy as np
import psutil
import pytest
from dialogue_helpers import TOKENS, dialogue_settings_for, serve, storage_settings_for
from storage_helpers import frame_jpeg, heatmap_for, make_verdicts, minute_ago, wait_until

from lineguard.kafka import ensure_topics
from lineguard.settings import load_settings
from storage.masks import MAX_MASK_PIXELS, MaskError, decode_mask
from storage.records import PendingRecord, RecordStore, SaveBatch

FRAME = 64   # the stored frames are 64 x 64 px


class Line:
    def __init__(self, settings, storage_settings, folder, frame_ids):
        self.settings = settings
        self.storage_settings = storage_settings
        self.folder = folder
        self.frame_ids = frame_ids


@pytest.fixture(scope="module")
def line(stack, tmp_path_factory):
    """Six flagged records of product disc, 64 x 64 px frames, saved by the real RecordStore."""
    folder = tmp_path_factory.mktemp("limits")
    settings = load_settings(state_dir=folder / "state", kafka_bootstrap=stack.kafka_bootstrap,
                             influx_url=stack.influx_url, topic_prefix=f"limits-{time.monotonic_ns()}.")
    asyncio.run(ensure_topics(settings))
    storage_settings = storage_settings_for(folder)
    verdicts = make_verdicts(6, start=minute_ago(5), defect_rate=1.0, products=("disc",), prefix="lim")
    store = RecordStore.from_settings(settings, storage_settings)
    try:
        store.save(SaveBatch(records=[PendingRecord(v, frame_jpeg(i, FRAME), heatmap_for(v, FRAME), "flagged")
                                      for i, v in enumerate(verdicts)]))
    finally:
        store.close()
    return Line(settings, storage_settings, folder, [v.frame_id for v in verdicts])


@pytest.fixture(scope="module")
def service(line):
    with serve(line.settings, line.storage_settings,
               dialogue_settings_for(line.folder / "svc", streams_per_token=2, streams_total=3, header_timeout_s=1.0,
                                     labels_per_hour=1000)) as running:
        yield running


def _address(service) -> tuple[str, int]:
    parts = urlsplit(service.base_url)
    return parts.hostname, parts.port


def _status_of(sock: socket.socket) -> tuple[int, bytes]:
    """The status code and head of the response on `sock` (reads until the end of the headers)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]), data


def _send_quietly(sock: socket.socket, chunks) -> threading.Thread:
    """Send `chunks` in the background until the server stops reading or closes (then stop)."""

    def run() -> None:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _ask_path(line) -> str:
    return f"/api/records/{line.frame_ids[0]}/questions"


# --- bodies ----------------------------------------------------------------------------------------

def test_a_30_mb_body_without_a_token_is_refused_before_it_is_read(line, service):
    process = psutil.Process()
    rss_before = process.memory_info().rss
    block = b"x" * 65536
    started = time.monotonic()
    with socket.create_connection(_address(service), timeout=30) as sock:
        sock.sendall(_head("POST", _ask_path(line), {"Content-Type": "application/json",
                                                     "Content-Length": str(30 * 1024 * 1024)}))
        sender = _send_quietly(sock, (block for _ in range(30 * 16)))
        status, head = _status_of(sock)
        elapsed = time.monotonic() - started
    sender.join(30)
    assert status == 413, head
    assert elapsed < 10, f"the refusal took {elapsed:.1f} s"
    grown_mb = (process.memory_info().rss - rss_before) / 2**20
    assert grown_mb < 20, f"the server process grew by {grown_mb:.0f} MB"


def test_a_chunked_body_without_a_token_gets_401_and_past_the_cap_413(line, service):
    chunk = b"1000\r\n" + b"x" * 0x1000 + b"\r\n"
    for headers, expected in (({}, 401), ({"Authorization": f"Bearer {TOKENS['operator']}"}, 413)):
        with socket.create_connection(_address(service), timeout=30) as sock:
            sock.sendall(_head("POST", _ask_path(line), {"Content-Type": "application/json",
                                                         "Transfer-Encoding": "chunked"} | headers))
            sender = _send_quietly(sock, (chunk for _ in range(64)))   # 256 KiB > the 16 KiB cap of a question
            status, head = _status_of(sock)
        sender.join(30)
        assert status == expected, head


def test_without_a_token_invalid_json_gets_401_and_with_one_422(line, service):
    url = f"{service.base_url}{_ask_path(line)}"
    headers = {"Content-Type": "application/json"}
    assert httpx.post(url, content=b"{not json", headers=headers).status_code == 401
    assert httpx.post(url, content=b"{not json", headers=headers | {"Authorization": "Bearer wrong"}).status_code == 401
    with_token = httpx.post(url, content=b"{not json", headers=headers | service.headers("operator"))
    assert with_token.status_code == 422 and with_token.json()["detail"][0]["loc"][0] == "body"
    assert httpx.post(url, json={"question": ""}, headers=service.headers("operator")).status_code == 422
    # a label may be as large as the broker's message limit, not larger
    label = f"{service.base_url}/api/records/{line.frame_ids[0]}/label"
    big = b'{"is_defect": true, "note": "' + b"x" * (line.settings.kafka_max_message_bytes + 1) + b'"}'
    assert httpx.post(label, content=big, headers=headers | service.headers("operator")).status_code == 413


# --- SSE streams -----------------------------------------------------------------------------------

def test_sse_streams_are_capped_per_token_and_in_total(service):
    slots = service.app.state.service.limits.streams
    with httpx.Client(base_url=service.base_url, timeout=30) as client:
        def open_stream(role: str):
            context = client.stream("GET", "/api/stream", headers=service.headers(role))
            response = context.__enter__()
            return context, response

        opened = []
        try:
            for role in ("viewer", "viewer"):
                opened.append(open_stream(role))
                assert opened[-1][1].status_code == 200
            third, refused = open_stream("viewer")           # the token's third stream
            assert refused.status_code == 429 and refused.headers["Retry-After"]
            third.__exit__(None, None, None)
            opened.append(open_stream("operator"))           # the service's third
            assert opened[-1][1].status_code == 200
            fourth, refused = open_stream("admin")           # the service's fourth
            assert refused.status_code == 429
            fourth.__exit__(None, None, None)
            context, _ = opened.pop(0)
            context.__exit__(None, None, None)               # a stream closed frees its slot
            assert wait_until(lambda: sum(slots.open.values()) == 2, timeout_s=30, interval_s=0.1)
            opened.append(open_stream("admin"))
            assert opened[-1][1].status_code == 200
        finally:
            for context, _ in opened:
                context.__exit__(None, None, None)
    assert wait_until(lambda: not slots.open, timeout_s=30, interval_s=0.1)


# --- connections -----------------------------------------------------------------------------------

def test_a_half_sent_request_is_closed_within_the_header_timeout(line, service):
    timeout_s = service.app.state.service.dialogue.header_timeout_s
    full = _head("GET", "/api/me", service.headers("viewer"))
    for first, then in ((b"", b""), (full[:30], b""), (full, full[:30])):   # nothing; half; a request, then half
        with socket.create_connection(_address(service), timeout=60) as sock:
            started = time.monotonic()
            if first:
                sock.sendall(first)
            if then:
                status, _ = _status_of(sock)
                assert status == 200
                started = time.monotonic()
                sock.sendall(then)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            elapsed = time.monotonic() - started
        assert data == b"", data
        assert elapsed < timeout_s + 10, f"a half request was held {elapsed:.1f} s"


# --- masks and label quota -------------------------------------------------------------------------

def _png(image: np.ndarray) -> str:
    return base64.b64encode(cv2.imencode(".png", image)[1].tobytes()).decode()


def _claimed_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height 8-bit grayscale pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 16)   # far fewer than the header claims
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def test_masks_are_decoded_at_the_door(line, service):
    url = f"{service.base_url}/api/records/{line.frame_ids[1]}/label"
    operator = service.headers("operator")
    good = np.zeros((FRAME, FRAME), np.uint8)
    good[10:20, 10:20] = 255
    cases = {
        "garbage": base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"garbage" * 100).decode(),
        "three channels": _png(np.zeros((FRAME, FRAME, 3), np.uint8)),
        "wrong shape": _png(np.zeros((FRAME // 2, FRAME), np.uint8)),
        "16 bit": _png(np.zeros((FRAME, FRAME), np.uint16)),
        "oversized": base64.b64encode(_claimed_png(60_000, 60_000)).decode(),
        "not a png": base64.b64encode(b"GIF89a").decode(),
    }
    for name, mask in cases.items():
        response = httpx.post(url, json={"is_defect": True, "mask_png": mask}, headers=operator, timeout=30)
        assert response.status_code == 422, (name, response.text)
        assert response.json()["detail"][0]["loc"] == ["body", "mask_png"], name
    accepted = httpx.post(url, json={"is_defect": True, "defect_type": "scratch", "mask_png": _png(good)},
                          headers=operator, timeout=30)
    assert accepted.status_code == 202, accepted.text


def test_training_decodes_masks_under_the_same_limit(line):
    """Masks stored before the API checked them (or by another producer): training refuses the same ones."""
    from lineguard.events import Label
    from storage.labels import training_examples
    from training.train import _mask

    with pytest.raises(MaskError, match="pixels"):
        decode_mask(_claimed_png(60_000, 60_000))
    assert MAX_MASK_PIXELS < 60_000 * 60_000
    with pytest.raises(MaskError):
        decode_mask(_claimed_png(8, 8))   # the header is fine, the data is not 8 x 8 pixels
    drawn = np.zeros((FRAME, FRAME), np.uint8)
    drawn[:8, :8] = 255
    masks = {line.frame_ids[3]: _claimed_png(60_000, 60_000),
             line.frame_ids[4]: cv2.imencode(".png", drawn)[1].tobytes()}
    store = RecordStore.from_settings(line.settings, line.storage_settings)
    try:
        store.save(SaveBatch(records=[], labels=[Label(frame_id=f, operator="bob", is_defect=True, mask_png=m)
                                                 for f, m in masks.items()]))
        examples = {e.frame_id: e for e in training_examples(store) if e.frame_id in masks}
        assert _mask(store, examples[line.frame_ids[3]]) is None        # refused: the verdict's regions stand in
        decoded = _mask(store, examples[line.frame_ids[4]])
        assert decoded is not None and decoded.shape == (FRAME, FRAME) and decoded.sum() == 64
    finally:
        store.close()


def test_labels_past_the_operators_hourly_quota_get_429(line):
    with serve(line.settings, line.storage_settings, dialogue_settings_for(line.folder / "quota", labels_per_hour=2)
               ) as quota_service:
        url = f"{quota_service.base_url}/api/records/{line.frame_ids[2]}/label"
        for _ in range(2):
            response = httpx.post(url, json={"is_defect": False}, headers=quota_service.headers("operator"), timeout=30)
            assert response.status_code == 202, response.text
        refused = httpx.post(url, json={"is_defect": False}, headers=quota_service.headers("operator"), timeout=30)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
        # the quota is the operator's: another operator's labels still go
        other = httpx.post(url, json={"is_defect": False}, headers=quota_service.headers("admin"), timeout=30)
        assert other.status_code == 202


# --- dates -----------------------------------------------------------------------------------------

def test_out_of_range_dates_and_periods_get_422(line, service):
    viewer = service.headers("viewer")
    records = f"{service.base_url}/api/records"
    for params in ({"since": "0001-01-01T00:00:00+01:00"}, {"until": "9999-12-31T23:59:59-01:00"},
                   {"since": "0001-01-01T00:00:00"}):
        response = httpx.get(records, params=params, headers=viewer)
        assert response.status_code == 422, (params, response.text)
    assert httpx.get(records, params={"since": "2020-01-01T00:00:00+01:00"}, headers=viewer).status_code == 200
    ask = f"{service.base_url}{_ask_path(line)}"
    operator = service.headers("operator")
    for question in ("How many in the last 99999999 days?", "How many in the last 99999999999999999999 hours?",
                     "How often in the past 5000000 weeks on line-1?"):
        response = httpx.post(ask, json={"question": question}, headers=operator, timeout=30)
        assert response.status_code == 422, (question, response.text)
        assert "at most" in response.json()["detail"][0]["msg"]
    counted = httpx.post(ask, json={"question": "How many in the last 10 days?"}, headers=operator, timeout=30)
    assert counted.status_code == 200 and counted.json()["intent"] == "history"


# --- the free-form queue -----------------------------------------------------------------------------

def _bare_model():
    """The real InspectionModel with no references: a free-form answer of a stored record finds none and falls
    back to the facts, so nothing here needs the LLM loaded (the warm-up below loads it)."""
    from inference.model.api import InspectionModel, ModelConfig

    return InspectionModel(ModelConfig(device="cpu"))


def test_free_form_questions_past_the_queue_get_503_while_other_routes_answer(line):
    """One free-form question holds the LLM queue (of 1); the next ones are refused at once with Retry-After,
    while records and fact answers are served."""
    settings = dialogue_settings_for(line.folder / "llm-queue", answerer="lvlm", warm_up=False, llm_queue=1,
                                     llm_retry_after_s=7)
    with serve(line.settings, line.storage_settings, settings, model=_bare_model()) as llm_service, \
            ThreadPoolExecutor(1) as background:
        state = llm_service.app.state.service
        queue, free_form = state.limits.free_form, state.answerer.free_form
        ask = f"{llm_service.base_url}{_ask_path(line)}"
        operator = llm_service.headers("operator")
        # hold the model's one thread, as a long answer would: the next free-form question waits in the queue
        gate = threading.Event()
        free_form._thread.submit(gate.wait, 600)
        try:
            first = background.submit(httpx.post, ask, json={"question": "Describe the surface in a few words."},
                                      headers=operator, timeout=600)
            assert wait_until(lambda: queue.pending == 1, timeout_s=60, interval_s=0.05)
            for _ in range(3):
                refused = httpx.post(ask, json={"question": "Describe it."}, headers=operator, timeout=30)
                assert refused.status_code == 503, refused.text
                assert refused.headers["Retry-After"] == "7"
            listed = httpx.get(f"{llm_service.base_url}/api/records", headers=operator, timeout=30)
            assert listed.status_code == 200 and len(listed.json()["items"]) == len(line.frame_ids)
            fact = httpx.post(ask, json={"question": "Where is the defect?"}, headers=operator, timeout=30)
            assert fact.status_code == 200 and fact.json()["intent"] == "position"
            assert not first.done() and queue.pending == 1
        finally:
            gate.set()
        answered = first.result(timeout=120)
        assert answered.status_code == 200 and answered.json()["intent"] == "free_form", answered.text
        assert wait_until(lambda: queue.pending == 0, timeout_s=30, interval_s=0.05)


@pytest.mark.slow
@pytest.mark.timeout(900)   # waits for the LLM to load: minutes on 2 shared cores
def test_while_the_llm_loads_a_free_form_question_gets_the_facts_at_once(line):
    settings = dialogue_settings_for(line.folder / "llm-loading", answerer="lvlm", warm_up=True)
    with serve(line.settings, line.storage_settings, settings, model=_bare_model()) as llm_service:
        free_form = llm_service.app.state.service.answerer.free_form
        assert free_form.state == "loading"   # the warm-up loads the LLM on the model's thread (tens of seconds)
        started = time.monotonic()
        response = httpx.post(f"{llm_service.base_url}{_ask_path(line)}", json={"question": "Describe it."},
                              headers=llm_service.headers("operator"), timeout=120)
        elapsed = time.monotonic() - started
        assert response.status_code == 200 and response.json()["intent"] == "free_form", response.text
        assert "still loading" in response.json()["answer"]
        assert elapsed < 60, f"the answer waited {elapsed:.0f} s behind the loading LLM"
        # let the warm-up end before the service stops (its thread would outlive the test)
        assert wait_until(lambda: free_form.state != "loading", timeout_s=800, interval_s=0.5)
