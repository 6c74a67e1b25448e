"""`SwapGate`: the one way both servers load a model while running (`prime serve`'s
POST /admin/models, `jarvis serve`'s POST /api/model), and what such a request may ask.

- Names only. A request names a catalog or store model and loads that model's folder
  in the store; it cannot point the server at whatever folder holds a `prime.json`
  (a model is a set of files the backends parse). A filesystem path is a 400 naming
  the field unless the operator started the server with `--allow-model-paths`; an
  unknown name is a 404.
- One load at a time. A model holds gigabytes: a swap asked for while another (or the
  server's first model) is loading is a 409, not a second model in memory.
- Failures are the server's error shape (never a plain-text 500), and change nothing:
  the model being served stays.

Who may swap is decided before the body is read, by the `Guard`'s admin key
(middleware.py); swaps are off on a server started without one.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

from jarvis_prime.errors import ModelNotAvailableError, ModelNotFoundError, PrimeError, UnsafeNameError
from jarvis_prime.manifest import check_name
from jarvis_prime.serving.errors import APIError
from jarvis_prime.serving.host import ModelHost
from jarvis_prime.store.index import resolve

Model = TypeVar("Model")
log = logging.getLogger(__name__)


class SwapGate:
    """Loads models into `host`, one at a time. `allow_paths`: a request may name any
    directory that holds a `prime.json` (off unless the operator says so)."""

    def __init__(self, host: ModelHost, *, allow_paths: bool = False) -> None:
        self.host, self.allow_paths = host, allow_paths
        self._loading = threading.Lock()

    def swap(self, requested: str | None, load: Callable[[str | None], Model], served_name: str | None = None) -> Model:
        """Load what `requested` names with `load(target)` and serve it from now on.
        Blocks while loading: call it off the event loop. `requested` None is the
        server's own configured model (`load(None)`: the operator's choice, not checked)."""
        if requested is not None:
            self._check(requested)
        with self._one_at_a_time():
            target = None if requested is None else self._target(requested)
            model = _loaded(requested, lambda: load(target))
            self.host.swap(model, served_name or model.name)
        return model

    def startup(self, load: Callable[[], Model]) -> Model:
        """The server's first model, loaded under the same rule (a swap meanwhile is 409)."""
        with self._loading:
            return load()

    def _check(self, requested: str) -> None:
        """A path, when paths are off: 400 before anything is touched."""
        if self.allow_paths:
            return
        try:
            check_name("model", requested)
        except UnsafeNameError:
            raise APIError(400, f"model: {requested!r} is not a model name; this server loads catalog or store "
                                "names only (filesystem paths need --allow-model-paths)",
                           param="model", code="invalid_value") from None

    def _target(self, requested: str) -> str:
        """What `load` is given: a name's folder in the store (pulled first from an
        offline source if need be, never a folder of that name elsewhere), or, with
        paths allowed, the request as the CLI would take it."""
        if self.allow_paths:
            return requested
        return str(_loaded(requested, lambda: resolve(requested, paths=False)).path)

    @contextmanager
    def _one_at_a_time(self) -> Iterator[None]:
        if not self._loading.acquire(blocking=False):
            raise APIError(409, "a model is already loading on this server; retry when it has finished",
                           code="swap_in_progress")
        try:
            yield
        finally:
            self._loading.release()


def _loaded(requested: str | None, load: Callable[[], Any]) -> Any:
    """`load()`, its failure turned into the answer it deserves: unknown or absent
    models 404, models (or options) that cannot load here 400, anything else 500 with the reason."""
    try:
        return load()
    except APIError:
        raise
    except (ModelNotFoundError, ModelNotAvailableError) as err:
        raise APIError(404, f"model: {err}", param="model", code="model_not_found") from None
    except (PrimeError, ValueError) as err:
        raise APIError(400, f"model: {err}", param="model", code="model_not_loadable") from None
    except Exception as err:  # noqa: BLE001  (a backend's own failure: say what it was, keep serving)
        log.exception("could not load %s", requested)
        raise APIError(500, f"could not load {requested!r}: {type(err).__name__}: {err}", type_="server_error",
                       code="load_failed") from None
