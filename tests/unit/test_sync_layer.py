"""The one sync layer over the async core (offload._loop): ``on_loop``/``on_loop_iter`` put an async method on the
private loop whichever loop awaits it, ``blocking``/``blocking_iter`` make its sync form in one line; and no public
class keeps a twin written by hand."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import pytest

import offload
from offload import _loop


class Toy:
    """A stand-in for Site or Job: where each form ran is recorded."""

    def __init__(self) -> None:
        self.ran_on: list[tuple[asyncio.AbstractEventLoop, threading.Thread]] = []

    def _here(self) -> None:
        self.ran_on.append((asyncio.get_running_loop(), threading.current_thread()))

    @_loop.on_loop
    async def ascale(self, x: int, *, by: int = 2) -> int:
        """``x`` times ``by``, on the private loop.

        A second paragraph the sync form's docstring leaves to this one."""
        self._here()
        await asyncio.sleep(0)
        return x * by

    scale = _loop.blocking(ascale)

    @_loop.on_loop
    async def atimed(self, words: str) -> None:
        raise TimeoutError(words)

    timed = _loop.blocking(atimed)

    @_loop.on_loop
    async def done(self) -> str:
        return "done"

    wait = _loop.blocking(done, name="wait")

    @_loop.on_loop_iter
    def acount(self, n: int) -> AsyncIterator[int]:
        """0 to ``n - 1``, made on the private loop."""
        if n < 0:
            raise ValueError("n must be at least 0")  # raised at the call, in both forms
        return self._count(n)

    count = _loop.blocking_iter(acount)

    async def _count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            self._here()
            await asyncio.sleep(0)
            yield i


def on_io_thread(toy: Toy) -> None:
    assert all(loop is _loop.loop() and thread.name == "offload-io" for loop, thread in toy.ran_on)
    assert toy.ran_on


def test_the_sync_form_runs_on_the_private_loop_from_any_thread():
    toy = Toy()
    assert toy.scale(3) == 6
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(lambda x: toy.scale(x, by=10), [1, 2])) == [10, 20]
        assert pool.submit(lambda: list(toy.count(3))).result() == [0, 1, 2]
    on_io_thread(toy)


def test_the_async_form_runs_on_the_private_loop_from_another_loop():
    toy = Toy()

    async def elsewhere() -> tuple[int, list[int], asyncio.AbstractEventLoop]:
        return await toy.ascale(4), [i async for i in toy.acount(2)], asyncio.get_running_loop()

    with ThreadPoolExecutor(1) as pool:  # asyncio.run in a thread: a loop of its own, as a hub's or a server's
        scaled, counted, caller = pool.submit(asyncio.run, elsewhere()).result()
    assert (scaled, counted) == (8, [0, 1])
    on_io_thread(toy)
    assert all(loop is not caller for loop, _ in toy.ran_on)


async def test_the_async_form_on_the_private_loop_itself_runs_directly():
    toy = Toy()

    async def inside() -> tuple[int, list[int]]:
        return await toy.ascale(5, by=3), [i async for i in toy.acount(2)]

    assert await _loop.bridge(inside()) == (15, [0, 1])
    on_io_thread(toy)


def test_the_sync_form_from_the_io_thread_raises_clearly():
    toy = Toy()

    async def blocking_on_the_io_thread() -> None:
        toy.scale(1)

    async def iterating_on_the_io_thread() -> None:
        toy.count(1)  # at the call, before any iteration

    for wrong in (blocking_on_the_io_thread, iterating_on_the_io_thread):
        with pytest.raises(RuntimeError, match="called from its own I/O thread; use the async variant"):
            _loop.run(wrong())
    assert toy.ran_on == []


def test_errors_keep_their_class_and_words():
    toy = Toy()
    with pytest.raises(TimeoutError, match="^the job did not end within 5 s$"):
        toy.timed("the job did not end within 5 s")
    with pytest.raises(ValueError, match="at least 0"):
        toy.count(-1)  # the async form's own check, at the call


async def test_errors_keep_their_class_and_words_in_the_async_form():
    with pytest.raises(TimeoutError, match="^slow$"):
        await Toy().atimed("slow")
    with pytest.raises(ValueError, match="at least 0"):
        Toy().acount(-1)


def test_the_sync_form_reads_as_its_async_form_says():
    assert inspect.signature(Toy.scale) == inspect.signature(Toy.ascale)
    assert str(inspect.signature(Toy.scale)) == "(self, x: 'int', *, by: 'int' = 2) -> 'int'"
    assert str(inspect.signature(Toy.count)) == "(self, n: 'int') -> 'Iterator[int]'"
    assert (Toy.scale.__name__, Toy.scale.__qualname__, Toy.scale.__module__) == ("scale", "Toy.scale", __name__)
    assert (Toy.wait.__name__, Toy.wait.__qualname__) == ("wait", "Toy.wait")
    assert (Toy.count.__name__, Toy.count.__qualname__) == ("count", "Toy.count")
    assert Toy.scale.__doc__ == "Sync form of :meth:`ascale`.\n\n``x`` times ``by``, on the private loop."
    assert Toy.count.__doc__ == "Sync form of :meth:`acount`.\n\n0 to ``n - 1``, made on the private loop."
    assert Toy.timed.__doc__ == "Sync form of :meth:`atimed`."
    assert "Sync form of :meth:`ascale`." in inspect.getdoc(Toy().scale)
    assert _loop.async_form(Toy.scale) is Toy.ascale and _loop.async_form(Toy.count) is Toy.acount
    assert _loop.async_form(Toy._here) is None


def test_what_the_layer_refuses():
    async def finished() -> None:
        pass

    def sync() -> None:
        pass

    with pytest.raises(TypeError, match="does not start with 'a'"):
        _loop.blocking(finished)
    with pytest.raises(TypeError, match="async def"):
        _loop.blocking(sync)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="async def"):
        _loop.on_loop(sync)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="async iterator"):
        _loop.blocking_iter(finished)  # type: ignore[arg-type]


# -- no twin written by hand ----------------------------------------------------------------------------------

_HOP = _loop.on_loop(Toy.done.__wrapped__).__code__  # every on_loop method shares its wrapper's code
_HOP_ITER = _loop.on_loop_iter(Toy.acount.__wrapped__).__code__
# Sync forms whose name is not the async one's without its "a".
_IRREGULAR = {"finished": "wait", "await_state": "wait_for_state"}


def _async_methods(cls: type) -> dict[str, object]:
    """The public async methods of ``cls``: coroutine methods and methods that return an async iterator."""
    found = {}
    for name, attr in vars(cls).items():
        if name.startswith("_") or not callable(attr):
            continue
        if inspect.iscoroutinefunction(attr) or getattr(attr, "__code__", None) is _HOP_ITER:
            found[name] = attr
    return found


def hand_written(cls: type) -> list[str]:
    """What breaks the layer in ``cls``: an async method that does not run on the private loop whichever loop
    awaits it, a sync twin not made from its async form, a made one whose name is not its attribute's."""
    wrong = []
    for name, amethod in _async_methods(cls).items():
        if getattr(amethod, "__code__", None) not in (_HOP, _HOP_ITER):
            wrong.append(f"{cls.__name__}.{name} is not decorated with _loop.on_loop (or on_loop_iter)")
        sync_name = _IRREGULAR.get(name, name[1:] if name.startswith("a") else None)
        sync = vars(cls).get(sync_name) if sync_name else None
        if sync is not None and _loop.async_form(sync) is not amethod:
            wrong.append(f"{cls.__name__}.{sync_name} is written by hand: make it _loop.blocking({name})")
    for name, attr in vars(cls).items():
        made = callable(attr) and _loop.async_form(attr) is not None
        if made and (attr.__name__, attr.__qualname__) != (name, f"{cls.__qualname__}.{name}"):
            wrong.append(f"{cls.__name__}.{name} is named {attr.__qualname__}: give blocking() its name=")
    return wrong


@pytest.mark.parametrize("cls", [offload.Site, offload.Job, offload.Images, offload.Forward])
def test_every_sync_twin_of_the_public_classes_is_made_by_the_layer(cls):
    assert _async_methods(cls)
    assert hand_written(cls) == []


def test_the_walk_finds_a_twin_written_by_hand():
    class Old:
        async def astatus(self) -> int:
            return await _loop.bridge(asyncio.sleep(0, 1))

        def status(self) -> int:
            return _loop.run(asyncio.sleep(0, 1))

        @_loop.on_loop
        async def afind(self) -> int:
            return 1

        find = _loop.blocking(afind, name="lookup")

    assert hand_written(Old) == [
        "Old.astatus is not decorated with _loop.on_loop (or on_loop_iter)",
        "Old.status is written by hand: make it _loop.blocking(astatus)",
        "Old.find is named test_the_walk_finds_a_twin_written_by_hand.<locals>.Old.lookup: give blocking() its name=",
    ]
