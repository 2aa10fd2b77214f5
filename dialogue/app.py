"""The dialogue service (`lineguard dialogue`): a FastAPI app over the inspection records.

Operators look at flagged parts, ask about them, see similar past parts and label them. The app reads the
records through `RecordStore` (the database and artifact store of `lineguard store`), answers questions from
the facts (`answers.py`), keeps conversations in the records database, publishes labels on the labels topic
(the recorder stores them) and streams newly flagged verdicts over SSE. The console (dialogue/static) is
served at `/`. Routes and shapes: CONTRACT.md beside this file; OpenAPI at `/api/openapi.json`.

    >>> app = create_app(settings, load_dialogue_settings(), load_storage_settings())
    >>> uvicorn.run(app, host="127.0.0.1", port=8080, access_log=False)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path as FilePath
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, ServerSentEvent
from fastapi.staticfiles import StaticFiles
from sqlalchemy import select
from starlette.exceptions import HTTPException as StarletteHTTPException

from dialogue.answers import Answerer, LvlmAnswerer, PeriodError
from dialogue.auth import Principal, RateLimiter, Role, TokenRegistry
from dialogue.conversations import ConversationStore, Turn
from dialogue.limits import BodyLimit, Limits, body_caps, body_schema, frame_shape, parse_body
from dialogue.schemas import (
    Answer,
    Conversation,
    Health,
    LabelAccepted,
    LabelRequest,
    Me,
    QueryTime,
    QuestionRequest,
    RecordDetail,
    RecordPage,
    RecordSummary,
    SimilarPart,
    SimilarParts,
    SourceOut,
    StoredLabel,
    StreamedVerdict,
)
from dialogue.security import AuthFailures, install_security
from dialogue.settings import DialogueSettings
from dialogue.stream import VerdictBroadcaster
from lineguard.events import ID_MAX_LENGTH, ID_PATTERN, Label
from lineguard.logging import get_logger
from lineguard.settings import Settings
from lineguard.topics import LABELS
from storage.artifacts import StorageError
from storage.masks import MaskError, decode_mask
from storage.records import InspectionRecord, RecordStore
from storage.schema import as_utc, labels
from storage.settings import StorageSettings, load_storage_settings

log = get_logger(__name__)

STATIC_DIR = FilePath(__file__).parent / "static"
FrameId = Annotated[str, Path(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN,
                              description="a frame id: letters, digits and . _ : @ + -")]
MEDIA = {"image": ("image_uri", "image/jpeg"), "heatmap": ("heatmap_uri", "image/png"),
         "overlay": ("overlay_uri", "image/jpeg")}


@dataclass
class Service:
    """Everything a request needs; one per app, on `app.state.service`."""

    settings: Settings
    dialogue: DialogueSettings
    store: RecordStore
    tokens: TokenRegistry
    limiter: RateLimiter
    answerer: Answerer
    conversations: ConversationStore
    broadcaster: VerdictBroadcaster
    producer: object | None = None
    producer_lock: asyncio.Lock | None = None
    limits: Limits | None = None                # bodies, streams, the LLM queue, label quotas (dialogue/limits.py)
    auth_failures: AuthFailures | None = None   # failed sign-ins per client address (dialogue/security.py)

    async def label_producer(self):
        """The Kafka producer of labels, started on first use (the API serves records without a broker)."""
        from lineguard.kafka import make_producer, start_client

        if self.producer_lock is None:
            self.producer_lock = asyncio.Lock()
        async with self.producer_lock:
            if self.producer is None:
                self.producer = await start_client(self.settings, make_producer(self.settings), timeout_s=10)
        return self.producer


# --- dependencies --------------------------------------------------------------------------------------

bearer = HTTPBearer(auto_error=False, description="a token from `lineguard dialogue token`")


# cheap dependencies are `async def`: they run on the event loop. FastAPI sends a plain `def` dependency to
# the thread pool, a hand-over per dependency per request.
async def get_service(request: Request) -> Service:
    return request.app.state.service


def requires(role: Role) -> Callable[..., Principal]:
    """Dependency: the request's principal, which must hold `role`; 401 / 403 / 429 otherwise."""

    async def dependency(request: Request, service: Annotated[Service, Depends(get_service)],
                         credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
        principal = service.tokens.verify(credentials.credentials) if credentials else None
        if principal is None:   # 401, or 429 once this address failed too often
            raise service.auth_failures.refusal(request)
        request.state.principal = principal.name
        if not principal.may(role):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"this needs the {role} role; {principal.name} is a "
                                                           f"{principal.role}")
        wait_s = service.limiter.take(principal.key)
        if wait_s > 0:
            raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, "rate limit exceeded; slow down",
                                headers={"Retry-After": str(max(1, round(wait_s + 0.5)))})
        return principal

    return dependency


Viewer = Annotated[Principal, Depends(requires("viewer"))]
Operator = Annotated[Principal, Depends(requires("operator"))]
ServiceDep = Annotated[Service, Depends(get_service)]


# request bodies are dependencies of the principal: read (BodyLimit caps them) only once the token is checked,
# so a caller without a token gets 401 whatever it sent
async def question_body(principal: Operator, request: Request) -> QuestionRequest:
    return await parse_body(request, QuestionRequest)


async def label_body(principal: Operator, request: Request) -> LabelRequest:
    return await parse_body(request, LabelRequest)


async def stream_slot(principal: Viewer, service: ServiceDep) -> AsyncIterator[None]:
    """One of the token's (and the service's) SSE streams, held while the stream is open; 429 beyond."""
    refusal = service.limits.stream_refusal(principal.key)
    if refusal is not None:
        raise refusal
    try:
        yield
    finally:
        service.limits.streams.release(principal.key)


def get_record(frame_id: FrameId, service: ServiceDep) -> InspectionRecord:
    record = service.store.get(frame_id)
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no record of frame {frame_id}")
    return record


RecordDep = Annotated[InspectionRecord, Depends(get_record)]


def _unprocessable(field: str, message: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                         [{"loc": ["body", field], "msg": message, "type": "value_error"}])


def _answer(turn: Turn) -> Answer:
    return Answer(frame_id=turn.frame_id, question=turn.question, answer=turn.answer, intent=turn.intent,
                  sources=[SourceOut(**s) for s in turn.sources], turn=turn.turn, operator=turn.operator,
                  asked_at=turn.asked_at, latency_ms=round(turn.latency_ms, 2))


# --- the app -------------------------------------------------------------------------------------------

def create_app(settings: Settings, dialogue_settings: DialogueSettings,
               storage_settings: StorageSettings | None = None, *, store: RecordStore | None = None,
               model=None) -> FastAPI:
    """The dialogue app. `store` and `model` (an InspectionModel for free-form answers) may be passed in;
    otherwise they are opened from the settings (the model on the first free-form question)."""
    storage_settings = storage_settings or load_storage_settings()
    store = store or RecordStore.from_settings(settings, storage_settings)
    tokens = TokenRegistry.load(dialogue_settings.token_file(settings),
                                dialogue_settings.tokens.get_secret_value() if dialogue_settings.tokens else None)
    if not tokens:
        log.warning("dialogue_no_tokens", tokens_file=str(dialogue_settings.token_file(settings)),
                    hint="create one with `lineguard dialogue token --role operator --name NAME`")
    free_form = None
    if dialogue_settings.answerer == "lvlm":
        from inference.references import ReferenceStore
        from inference.registry import ModelRegistry

        registry = ModelRegistry(store.url, store.artifacts)
        free_form = LvlmAnswerer(model if model is not None else _lazy_model(dialogue_settings),
                                 ReferenceStore.from_settings(settings), store.artifacts,
                                 history_turns=dialogue_settings.llm_history_turns,
                                 max_new_tokens=dialogue_settings.llm_max_new_tokens,
                                 adapters=registry.live_adapters)
    service = Service(settings=settings, dialogue=dialogue_settings, store=store, tokens=tokens,
                      limiter=RateLimiter(dialogue_settings.rate_limit_per_minute, dialogue_settings.rate_limit_burst),
                      answerer=Answerer(store, similar_k=dialogue_settings.similar_k, free_form=free_form),
                      conversations=ConversationStore(store.engine),
                      broadcaster=VerdictBroadcaster(settings, dialogue_settings.stream_queue),
                      limits=Limits.from_settings(dialogue_settings),
                      auth_failures=AuthFailures(dialogue_settings.auth_failure_limit,
                                                 dialogue_settings.auth_failure_window_s))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stream = asyncio.create_task(service.broadcaster.run())
        warming = None
        if free_form is not None and dialogue_settings.warm_up:
            free_form.state = "loading"
            warming = asyncio.create_task(asyncio.to_thread(free_form.warm_up, store.products()))
        log.info("dialogue_started", records=store.count_records(), tokens=len(tokens),
                 answerer=dialogue_settings.answerer, cors=bool(dialogue_settings.cors))
        try:
            yield
        finally:
            stream.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await stream
            if warming is not None and not warming.done():
                log.info("dialogue_stopping_while_warming_up")   # the thread ends with the process
            if service.producer is not None:
                with contextlib.suppress(Exception):
                    await service.producer.stop()
            service.limits.close()
            log.info("dialogue_stopped")

    app = FastAPI(title="lineguard dialogue", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, description="Ask about flagged parts, see them, label them.")
    app.state.service = service
    if dialogue_settings.cors:
        app.add_middleware(CORSMiddleware, allow_origins=dialogue_settings.cors, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, caps=body_caps(dialogue_settings, settings.kafka_max_message_bytes))
    _install_request_log(app)
    install_security(app)
    _routes(app)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _lazy_model(dialogue_settings: DialogueSettings):
    """An InspectionModel built on first use (loading the encoder costs seconds; fact answers never need it)."""

    class Lazy:
        _model = None

        def __getattr__(self, name):
            if Lazy._model is None:
                from inference.scorer import build_scorer

                Lazy._model = build_scorer(encoder=dialogue_settings.encoder, device=dialogue_settings.device,
                                           llm=dialogue_settings.llm)
            return getattr(Lazy._model, name)

    return Lazy()


def _answer_and_store(service: Service, record: InspectionRecord, question: str, operator: str) -> Turn:
    """Answer a question with the conversation so far and store the turn (blocking)."""
    turns = service.conversations
    if turns.count(record.frame_id) >= service.dialogue.max_turns:
        raise _unprocessable("question", f"this conversation has reached its {service.dialogue.max_turns} turns")
    started = time.perf_counter()
    try:
        reply = service.answerer.answer(record, question,
                                        lambda: [(t.question, t.answer) for t in turns.history(record.frame_id)])
    except PeriodError as exc:
        raise _unprocessable("question", str(exc)) from None
    latency_ms = (time.perf_counter() - started) * 1000
    return service.conversations.add(record.frame_id, operator=operator, question=question, answer=reply.answer,
                                     intent=reply.intent, sources=reply.sources, latency_ms=latency_ms)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]   # no "input" echo: a 10 kB question or a mask stays out of the reply
        return JSONResponse({"detail": errors}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.error("dialogue_error", path=request.url.path, error_type=type(exc).__name__,
                  error=str(exc).splitlines()[0][:300] if str(exc) else "")
        return JSONResponse({"detail": "internal error; the service log has the details"},
                            status_code=status.HTTP_500_INTERNAL_SERVER_ERROR)


def _install_request_log(app: FastAPI) -> None:
    """One structlog line per request: method, path, status, ms, who. Never headers or query strings
    (a token must not reach a log). A plain ASGI middleware: Starlette's `@app.middleware("http")` costs a
    task and a stream per request, a large share of a fact answer's ~3 ms."""
    app.add_middleware(RequestLog)


class RequestLog:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = 500

        async def sending(message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            log.info("request", method=scope["method"], path=scope["path"], status=status_code,
                     ms=round((time.perf_counter() - started) * 1000, 1),
                     who=scope.get("state", {}).get("principal"))


def _routes(app: FastAPI) -> None:  # noqa: C901 - one place lists every route
    @app.get("/healthz", response_model=Health, tags=["service"])
    def healthz(service: ServiceDep) -> Health:
        """Liveness; the only route without a token."""
        free_form = service.answerer.free_form
        return Health(records=service.store.count_records(), llm=free_form.state if free_form else "off")

    @app.get("/", include_in_schema=False)
    def console() -> Response:
        index = STATIC_DIR / "index.html"
        if not index.exists():
            return JSONResponse({"detail": "the console is not installed (dialogue/static/index.html)"}, 404)
        return FileResponse(index)

    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi(principal: Viewer) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/api/me", response_model=Me, tags=["service"])
    def me(principal: Viewer) -> Me:
        """Who this token is."""
        return Me(name=principal.name, role=principal.role)

    @app.get("/api/records", response_model=RecordPage, tags=["records"])
    def list_records(principal: Viewer, service: ServiceDep, since: QueryTime | None = None,
                     until: QueryTime | None = None,
                     line_id: Annotated[str | None, Query(max_length=ID_MAX_LENGTH, pattern=ID_PATTERN)] = None,
                     product: Annotated[str | None, Query(max_length=ID_MAX_LENGTH, pattern=ID_PATTERN)] = None,
                     camera_id: Annotated[str | None, Query(max_length=ID_MAX_LENGTH, pattern=ID_PATTERN)] = None,
                     verdict: Literal["anomalous", "normal"] | None = None,
                     label_status: Literal["unlabeled", "defect", "good"] | None = None,
                     limit: Annotated[int, Query(ge=1, le=200)] = 50,
                     offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0) -> RecordPage:
        """Stored records, newest first, by capture time [since, until), line, product, camera, verdict, label."""
        found = service.store.query(since=since, until=until, line_id=line_id, product=product, camera_id=camera_id,
                                    verdict=verdict, label_status=label_status, limit=limit + 1, offset=offset)
        return RecordPage(items=[RecordSummary.of(r) for r in found[:limit]], limit=limit, offset=offset,
                          next_offset=offset + limit if len(found) > limit else None)

    @app.get("/api/records/{frame_id}", response_model=RecordDetail, tags=["records"])
    def record_detail(principal: Viewer, service: ServiceDep, record: RecordDep) -> RecordDetail:
        """Verdict, regions, positions, first answer, label status and labels, model version."""
        verdict = record.verdict(service.store)
        with service.store.engine.connect() as conn:
            stored = conn.execute(select(labels).where(labels.c.frame_id == record.frame_id)
                                  .order_by(labels.c.labeled_at, labels.c.id)).all()
        summary = RecordSummary.of(record)
        return RecordDetail(**summary.model_dump(), regions=verdict.regions,
                            n_anomalies=len(verdict.positions) if verdict.is_anomalous else 0,
                            labels=[StoredLabel(operator=r.operator, is_defect=r.is_defect, defect_type=r.defect_type,
                                                note=r.note, labeled_at=as_utc(r.labeled_at)) for r in stored],
                            has_descriptor=verdict.descriptor is not None)

    def artifact(kind: str) -> Callable:
        column, media_type = MEDIA[kind]

        def route(principal: Viewer, service: ServiceDep, record: RecordDep) -> Response:
            uri = getattr(record, column)
            if not uri:
                raise HTTPException(status.HTTP_404_NOT_FOUND, f"frame {record.frame_id} has no stored {kind}")
            try:
                data = service.store.artifacts.get(uri)
            except StorageError:
                raise HTTPException(status.HTTP_404_NOT_FOUND, f"the {kind} of {record.frame_id} is gone") from None
            return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

        route.__doc__ = f"The stored {kind} ({media_type})."
        route.__name__ = f"record_{kind}"
        return route

    for kind, (_, media_type) in MEDIA.items():
        app.get(f"/api/records/{{frame_id}}/{kind}", tags=["records"], response_class=Response,
                responses={200: {"content": {media_type: {}}}, 404: {"description": "not stored"}})(artifact(kind))

    @app.post("/api/records/{frame_id}/questions", response_model=Answer, tags=["dialogue"],
              openapi_extra=body_schema(QuestionRequest))
    async def ask(principal: Operator, body: Annotated[QuestionRequest, Depends(question_body)], service: ServiceDep,
                  record: RecordDep) -> Answer:
        """Answer a question about this record from its facts; the turn is stored in the conversation."""
        limit = service.dialogue.max_question_chars
        if len(body.question) > limit:
            raise _unprocessable("question", f"a question has at most {limit} characters")
        # every database read and write of a question runs in the thread pool: the event loop only routes
        # ... but a question for the LLM waits in its own bounded queue (503 when full), off the shared pool
        if service.answerer.needs_model(record, body.question):
            turn = await service.limits.free_form.run(_answer_and_store, service, record, body.question, principal.name)
        else:
            turn = await run_in_threadpool(_answer_and_store, service, record, body.question, principal.name)
        log.info("question_answered", frame_id=record.frame_id, intent=turn.intent, ms=round(turn.latency_ms, 1),
                 who=principal.name, turn=turn.turn)
        return _answer(turn)

    @app.get("/api/records/{frame_id}/conversation", response_model=Conversation, tags=["dialogue"])
    def conversation(principal: Viewer, service: ServiceDep, record: RecordDep) -> Conversation:
        """Every question and answer about this record, oldest first."""
        return Conversation(frame_id=record.frame_id,
                            turns=[_answer(t) for t in service.conversations.history(record.frame_id)])

    @app.post("/api/records/{frame_id}/label", response_model=LabelAccepted, tags=["labels"],
              status_code=status.HTTP_202_ACCEPTED, openapi_extra=body_schema(LabelRequest))
    async def label(principal: Operator, body: Annotated[LabelRequest, Depends(label_body)], service: ServiceDep,
                    record: RecordDep) -> LabelAccepted:
        """Publish the operator's judgement as a Label event; the recorder stores it (202: accepted)."""
        if not body.is_defect and body.defect_type:
            raise _unprocessable("defect_type", "a good part has no defect type")
        service.limits.labels.refuse(principal.name)   # 429 past the operator's labels per hour
        if body.mask_png is not None:   # decoded here, under the pixel limit training uses too
            shape = await run_in_threadpool(frame_shape, service.store, record)
            try:
                await run_in_threadpool(decode_mask, body.mask_png, shape=shape)
            except MaskError as exc:
                raise _unprocessable("mask_png", str(exc)) from None
        event = Label(frame_id=record.frame_id, operator=principal.name, is_defect=body.is_defect,
                      defect_type=body.defect_type, mask_png=body.mask_png, note=body.note)
        data = event.to_bytes()
        if len(data) > service.settings.kafka_max_message_bytes:
            raise _unprocessable("mask_png", "the label is larger than the broker accepts; send a smaller mask")
        topic = service.settings.topic(LABELS)
        try:
            producer = await service.label_producer()
            await asyncio.wait_for(producer.send_and_wait(topic, data, key=record.frame_id.encode()),
                                   timeout=2 * service.settings.kafka_request_timeout_ms / 1000)
        except Exception as exc:  # noqa: BLE001 - the broker is away: the operator must know it was not saved
            log.error("label_not_published", frame_id=record.frame_id, who=principal.name,
                      error=str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                                "the label could not be published (Kafka unavailable); try again") from None
        log.info("label_published", frame_id=record.frame_id, who=principal.name, is_defect=body.is_defect,
                 defect_type=body.defect_type)
        return LabelAccepted(frame_id=event.frame_id, operator=event.operator, is_defect=event.is_defect,
                             defect_type=event.defect_type, note=event.note, labeled_at=event.labeled_at, topic=topic)

    @app.get("/api/records/{frame_id}/similar", response_model=SimilarParts, tags=["records"])
    def similar(principal: Viewer, service: ServiceDep, record: RecordDep,
                k: Annotated[int, Query(ge=1, le=50)] = 5) -> SimilarParts:
        """The k stored flagged parts of the same product whose defect looks most like this one's."""
        matches = service.store.similar(record.frame_id, k)
        return SimilarParts(frame_id=record.frame_id, k=k,
                            items=[SimilarPart(record=RecordSummary.of(m.record), similarity=m.similarity,
                                               defect_type=m.defect_type) for m in matches])

    @app.get("/api/stream", response_class=EventSourceResponse, tags=["records"])
    async def stream(principal: Viewer, service: ServiceDep,
                     slot: Annotated[None, Depends(stream_slot)]) -> AsyncIterator[ServerSentEvent]:
        """Server-sent events: `event: verdict` with each newly flagged verdict (StreamedVerdict JSON)."""
        # the stream ends within ~1 s of its token being revoked or expiring
        async for verdict in service.broadcaster.subscribe(lambda: service.tokens.still_valid(principal)):
            yield ServerSentEvent(data=StreamedVerdict.of(verdict).model_dump(mode="json"), event="verdict",
                                  id=verdict.frame_id)
