"""The worker's model in a process of its own: `score` runs in a child, so the pipeline's Python (the Kafka
client, decoding, serialising) never takes turns with the model's Python for the GIL.

A model whose time is in Python (a tiny ViT: many small torch ops) scores at its one-core speed only while
nothing else in its process wants the GIL; in the worker, the event loop and the output thread want it for
every frame. The child gets its own interpreter, one core's worth of torch threads, and a copy of the model
(built from its config; the weights travel through shared memory on a CPU). The parent keeps the model as
the authority: before each call the child receives the product states that changed since the last one
(`set_references`, a released version installed at a batch boundary), so it always scores what the parent
would.

    scoring = ModelProcess(model, torch_threads=1)      # spawns the child
    results = scoring.score(frames)                     # what model.score(frames) returns
    scoring.close()

A frame's exception in the child is raised again here, so the worker still isolates poison frames. A child
that died raises `ModelProcessDied` on every call, and the worker stops on it (ModelBroken) instead of
dead-lettering the line.
"""

from __future__ import annotations

import contextlib
import threading

from lineguard.logging import get_logger

log = get_logger(__name__)

START_TIMEOUT_S = 120.0


class ModelProcessDied(RuntimeError):
    """The model's process is gone (killed, out of memory, crashed): no frame can be scored any more."""


class ModelProcess:
    def __init__(self, model, torch_threads: int = 1):
        import torch.multiprocessing as torch_mp  # its pickling reductions send CPU tensors as shared memory

        self.model = model
        self._sent: dict[str, object] = {}       # product → the state object the child holds (compared by identity)
        self._lock = threading.Lock()
        context = torch_mp.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        # the child builds the model from its config and takes these weights (through shared memory on a CPU)
        weights = {"encoder": model.encoder.state_dict(), "decoder": model.decoder.state_dict()}
        self._process = context.Process(target=_serve, args=(model.config, weights, child_conn, torch_threads),
                                        name="lineguard-model", daemon=True)
        self._process.start()
        child_conn.close()
        if not self._conn.poll(START_TIMEOUT_S):
            self.close()
            raise ModelProcessDied(f"the model process did not start within {START_TIMEOUT_S:.0f} s")
        self._receive()                           # "ready", or the child's start-up error
        log.info("model_process_started", pid=self._process.pid, torch_threads=torch_threads)

    @staticmethod
    def supports(model) -> bool:
        """Whether the child can rebuild `model` (an InspectionModel: from its config and weights)."""
        from inference.model.api import InspectionModel

        return isinstance(model, InspectionModel)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def score(self, frames: list) -> list:
        """model.score(frames), run in the child with the parent model's current product states."""
        from inference.model.api import Frame

        frames = [Frame(f.image, f.product, getattr(f, "mm_per_px", None), getattr(f, "size", None))
                  if not isinstance(f, tuple) else f for f in frames]
        with self._lock:
            changed = self._changed_states()
            try:
                if changed:
                    self._conn.send(("states", changed))
                self._conn.send(("score", frames))
            except (BrokenPipeError, ConnectionResetError, EOFError, OSError) as exc:
                raise self._died(exc) from None
            if changed:
                self._sent.update(changed)
                for product in [p for p, state in changed.items() if state is None]:
                    del self._sent[product]
            return self._receive()

    def _changed_states(self) -> dict:
        live = dict(self.model.states)
        changed = {product: state for product, state in live.items() if self._sent.get(product) is not state}
        changed.update({product: None for product in self._sent if product not in live})
        return changed

    def _receive(self):
        try:
            kind, payload = self._conn.recv()
        except (EOFError, ConnectionResetError, OSError) as exc:
            raise self._died(exc) from None
        if kind == "error":
            raise payload
        return payload

    def _died(self, exc: BaseException) -> ModelProcessDied:
        self._process.join(timeout=1)
        return ModelProcessDied(f"the model process (pid {self._process.pid}) is gone, exit code "
                                f"{self._process.exitcode}: {type(exc).__name__}")

    def close(self) -> None:
        with self._lock:
            if self._process.is_alive():
                with contextlib.suppress(OSError):
                    self._conn.send(("stop", None))
                self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout=5)
            self._conn.close()


def _serve(config, weights: dict, conn, torch_threads: int) -> None:
    """The child: build the model, then apply state updates and score until told to stop or the parent goes."""
    import signal

    import torch

    from inference.model.api import InspectionModel

    # the parent says when the child stops (a "stop", or the pipe closing when the parent goes): a SIGTERM or
    # Ctrl-C sent to the whole process group (the demo's stop, a terminal) must not kill the model under a
    # worker that is still draining its batches
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(torch_threads)
    try:
        model = InspectionModel(config)
        model.encoder.load_state_dict(weights["encoder"])
        model.decoder.load_state_dict(weights["decoder"])
        del weights
    except Exception as exc:  # noqa: BLE001 - the parent raises it, naming why the model did not start
        conn.send(("error", _picklable(exc)))
        return
    conn.send(("ready", None))
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            return
        if kind == "stop":
            return
        if kind == "states":
            for product, state in payload.items():
                if state is None:
                    model.states.pop(product, None)
                else:
                    model.states[product] = state
            continue
        try:
            reply = ("ok", model.score(payload))
        except Exception as exc:  # noqa: BLE001 - the parent raises it again, to isolate the frame
            reply = ("error", _picklable(exc))
        conn.send(reply)


def _picklable(exc: Exception) -> Exception:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - an exception type that does not pickle travels as its message
        return RuntimeError(f"{type(exc).__name__}: {exc}")
