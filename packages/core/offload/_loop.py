"""The private event loop thread behind offload's sync API and its shared connections.

All site I/O runs on one asyncio loop in a daemon thread, so one SSH connection per site serves the whole
process: the CLI and Airflow (sync callers) and Dask or triggers (async callers on loops of their own).
Sync calls block on :func:`run`; async calls ``await`` :func:`bridge`, which hops onto the private loop and
back without blocking the caller's loop. This is httpx's "async first, sync as a thin layer", with the
extra rule that a connection never crosses loops.

That layer is written once, here: an operation is written as its async form, decorated with :func:`on_loop`
(:func:`on_loop_iter` for one that yields), and its sync form is one line, ``status = blocking(astatus)``
(:func:`blocking_iter` for one that yields).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import inspect
import logging
import os
import queue as _queue
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")
log = logging.getLogger("offload")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def loop() -> asyncio.AbstractEventLoop:
    """The private loop, started on first use."""
    global _loop, _thread
    with _lock:
        if _loop is None or _loop.is_closed():
            new_loop = asyncio.new_event_loop()
            ready = threading.Event()

            def serve() -> None:
                asyncio.set_event_loop(new_loop)
                new_loop.call_soon(ready.set)
                new_loop.run_forever()

            _thread = threading.Thread(target=serve, name="offload-io", daemon=True)
            _thread.start()
            ready.wait()
            _loop = new_loop
        return _loop


def on_private_loop() -> bool:
    try:
        return asyncio.get_running_loop() is _loop
    except RuntimeError:
        return False


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the private loop and wait for it from synchronous code."""
    if on_private_loop():
        coro.close()
        raise RuntimeError("offload's sync API was called from its own I/O thread; use the async variant")
    future = asyncio.run_coroutine_threadsafe(coro, loop())
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        if future.done():  # the coroutine's own TimeoutError (the same class since Python 3.11), with its words
            raise
        future.cancel()
        raise TimeoutError(f"no result within {timeout} s") from None
    except KeyboardInterrupt:
        future.cancel()
        raise


async def bridge(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` on the private loop from any other loop (or directly, when already on it)."""
    if on_private_loop():
        return await coro
    future = asyncio.run_coroutine_threadsafe(coro, loop())
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        future.cancel()
        raise


def spawn(coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
    """Start ``coro`` on the private loop without waiting for it."""
    return asyncio.run_coroutine_threadsafe(coro, loop())


async def _pump(items: AsyncIterator[T], put: Callable[[tuple[bool, Any]], object]) -> None:
    """Run ``items`` here, on the private loop, handing each on with ``put((True, item))``; then its end
    ``(False, None)`` or its error ``(False, exc)``, which the consumer raises."""
    try:
        async for item in items:
            put((True, item))
        put((False, None))
    except BaseException as exc:
        put((False, exc))
        if isinstance(exc, asyncio.CancelledError):
            raise


async def aiterate(items: AsyncIterator[T]) -> AsyncIterator[T]:
    """Iterate ``items``, an async iterator whose I/O belongs on the private loop, from any loop (directly when
    already on it): the iterator form of :func:`bridge`. Leaving the loop early stops ``items``."""
    if on_private_loop():
        async for item in items:
            yield item
        return
    caller = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()
    future = spawn(_pump(items, lambda item: caller.call_soon_threadsafe(queue.put_nowait, item)))
    try:
        while (item := await queue.get())[0]:
            yield item[1]
        if item[1] is not None:
            raise item[1]
    finally:
        future.cancel()


def iterate(items: AsyncIterator[T]) -> Iterator[T]:
    """Iterate ``items`` (run on the private loop) from synchronous code: the iterator form of :func:`run`.
    From the I/O thread itself it raises at once, as :func:`run` does."""
    if on_private_loop():
        raise RuntimeError("offload's sync API was called from its own I/O thread; use the async variant")
    return _iterate(items)


def _iterate(items: AsyncIterator[T]) -> Iterator[T]:
    queue: _queue.Queue[tuple[bool, Any]] = _queue.Queue()
    future = spawn(_pump(items, queue.put))
    try:
        while (item := queue.get())[0]:
            yield item[1]
        if item[1] is not None:
            raise item[1]
    finally:
        future.cancel()


# -- the sync layer, written once ---------------------------------------------------------------------------


def on_loop(method: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Decorate an async method (or function) so that its body runs on the private loop, where the sites'
    connections live, whichever loop awaits it (a web server's, a hub's, a triggerer's; :func:`bridge`)."""
    if not inspect.iscoroutinefunction(method):
        raise TypeError(f"on_loop decorates an 'async def', not {method!r}")

    @functools.wraps(method)
    async def hop(*args: P.args, **kwargs: P.kwargs) -> T:
        return await bridge(method(*args, **kwargs))

    return hop


def on_loop_iter(method: Callable[P, AsyncIterator[T]]) -> Callable[P, AsyncIterator[T]]:
    """:func:`on_loop` for a method that returns an async iterator: it is iterated on the private loop, whichever
    loop iterates the result (:func:`aiterate`). The method itself runs when called, so a check of its arguments
    raises at the call."""

    @functools.wraps(method)
    def hop_iter(*args: P.args, **kwargs: P.kwargs) -> AsyncIterator[T]:
        return aiterate(method(*args, **kwargs))

    return hop_iter


def blocking(amethod: Callable[P, Coroutine[Any, Any, T]], *, name: str | None = None) -> Callable[P, T]:
    """The sync form of the async ``amethod``, in one line: ``status = _loop.blocking(astatus)`` in a class body.
    It runs ``amethod`` on the private loop and blocks until it ends (:func:`run`: called from the I/O thread
    itself, it raises RuntimeError); its signature is ``amethod``'s and its docstring points there. ``name`` is
    the sync form's name, where it is not ``amethod``'s without its ``a`` (``wait = blocking(finished,
    name="wait")``)."""
    if not inspect.iscoroutinefunction(amethod):
        raise TypeError(f"blocking makes the sync form of an 'async def', not of {amethod!r}")

    def sync(*args: P.args, **kwargs: P.kwargs) -> T:
        return run(amethod(*args, **kwargs))

    return _twin(sync, amethod, name)


def blocking_iter(amethod: Callable[P, AsyncIterator[T]], *, name: str | None = None) -> Callable[P, Iterator[T]]:
    """:func:`blocking` for a method that returns an async iterator: ``logs = _loop.blocking_iter(alogs)`` gives
    an iterator whose items ``amethod``'s iterator yields on the private loop (:func:`iterate`)."""
    if inspect.iscoroutinefunction(amethod):
        raise TypeError(f"blocking_iter takes a method that returns an async iterator, not {amethod!r}")

    def sync(*args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        return iterate(amethod(*args, **kwargs))

    return _twin(sync, amethod, name, iterator=True)


def async_form(function: Callable[..., Any]) -> Callable[..., Any] | None:
    """The async method a sync one was made from by :func:`blocking` or :func:`blocking_iter` (else None)."""
    return getattr(function, "_offload_async_form", None)


def _twin(sync: Callable[P, T], amethod: Callable[..., Any], name: str | None, *, iterator: bool = False
          ) -> Callable[P, T]:  # fmt: skip
    """Dress ``sync`` as the sync form of ``amethod``: its name, signature and a docstring that points there."""
    if name is None:
        if not amethod.__name__.startswith("a"):
            raise TypeError(f"name the sync form of {amethod.__qualname__}: its name does not start with 'a'")
        name = amethod.__name__[1:]
    owner, dot, _ = amethod.__qualname__.rpartition(".")
    signature = inspect.signature(amethod)  # a coroutine's return annotation is already what the sync form returns
    returns = signature.return_annotation
    if iterator and isinstance(returns, str) and returns.startswith("AsyncIterator["):
        returns = returns.removeprefix("Async")
    summary = inspect.cleandoc(amethod.__doc__ or "").split("\n\n")[0]
    sync.__module__ = amethod.__module__
    sync.__name__ = name
    sync.__qualname__ = owner + dot + name
    sync.__doc__ = f"Sync form of :meth:`{amethod.__name__}`." + (f"\n\n{summary}" if summary else "")
    sync.__signature__ = signature.replace(return_annotation=returns)  # type: ignore[attr-defined]
    sync.__wrapped__ = amethod  # type: ignore[attr-defined]  # get_type_hints reads the annotations' module there
    sync._offload_async_form = amethod  # type: ignore[attr-defined]
    return sync


_kept: set[asyncio.Task[Any]] = set()


def keep(coro: Coroutine[Any, Any, Any]) -> None:
    """Run ``coro`` on the private loop to its end, even if its starter goes away: exit waits for it (e.g. the
    cancellation of jobs whose submission was interrupted)."""
    task = asyncio.get_running_loop().create_task(coro)
    _kept.add(task)
    task.add_done_callback(_kept.discard)


_cleanups: list[Callable[[], Coroutine[Any, Any, Any]]] = []


def at_exit(cleanup: Callable[[], Coroutine[Any, Any, Any]]) -> None:
    """Run ``cleanup()`` on the private loop when the interpreter exits (e.g. close connections)."""
    _cleanups.append(cleanup)


KEPT_BUDGET = 120.0  # seconds exit waits for kept work: a slow sbatch (its own timeout) and then the cancel (30 s)
CLEANUP_BUDGET = 10.0  # seconds for each cleanup at exit (closing a connection)
_SETTLE_TURNS = 20  # loop turns exit lets pass first (a cancellation takes 3 or 4 to reach its handler)


async def _run_cleanups() -> None:
    # A call the main thread interrupted just before it began to exit (Ctrl-C during a submission) learns of it
    # on this loop a few turns from now (its cancel, its wake-up, its handler, which keeps the work that must
    # still happen): let those turns pass before looking at what is kept. They were queued before this was.
    for _ in range(_SETTLE_TURNS):
        await asyncio.sleep(0)
    if _kept:
        log.warning("waiting for an interrupted submission to end, so its jobs are cancelled rather than left "
                    "running unrecorded (interrupt again to leave now)")  # fmt: skip
        with contextlib.suppress(Exception):
            await asyncio.wait(list(_kept), timeout=KEPT_BUDGET)
    for cleanup in reversed(_cleanups):
        # Exiting anyway: one failed cleanup must not skip the others.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(cleanup(), CLEANUP_BUDGET)
    current = asyncio.current_task()
    rest = [t for t in asyncio.all_tasks() if t is not current]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


def _shutdown() -> None:
    if _loop is None or _loop.is_closed() or not _loop.is_running():
        return
    with contextlib.suppress(Exception):
        # Long enough for what _run_cleanups allows itself: leaving earlier is how a job got in unrecorded. Never
        # sized by whether work is kept now: a submission interrupted just before exit is kept by the I/O thread
        # a moment later (it learns of the cancellation after this thread does), and _run_cleanups, which runs
        # after that, returns at once when nothing is kept.
        asyncio.run_coroutine_threadsafe(_run_cleanups(), _loop).result(
            KEPT_BUDGET + CLEANUP_BUDGET * (len(_cleanups) + 1)
        )
    _loop.call_soon_threadsafe(_loop.stop)


atexit.register(_shutdown)

_fork_hooks: list[Callable[[], None]] = []


def at_fork(hook: Callable[[], None]) -> None:
    """Call ``hook()`` in the child after ``os.fork()``, once offload's own state is reset there."""
    _fork_hooks.append(hook)


def _after_fork_in_child() -> None:
    """A forked child has no I/O thread: the parent's loop, its tasks and its connections are not ours. Start
    over lazily (a fresh loop on first use), and exit without waiting on a loop that does not run here."""
    global _loop, _thread, _lock
    _loop, _thread, _lock = None, None, threading.Lock()
    _kept.clear()
    for hook in _fork_hooks:
        hook()


os.register_at_fork(after_in_child=_after_fork_in_child)
