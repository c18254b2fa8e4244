"""asyncio support: awaiting a kvlink.Call.

`await worker.async_submit_store(spec)` works on any running asyncio loop:
the first await on a loop registers the runtime's host_fd() with the loop's
add_reader, so the loop calls Runtime.poll() whenever completions wait, and
each completion resolves its future on the loop's thread. kvlink's own
thread never runs Python; the loop never blocks on kvlink.
"""
import asyncio
import threading
import weakref

from .errors import Error

# loop -> {host fd: runtime} the loop polls (weak on both sides: a closed
# loop or a collected runtime drops out).
_watched = weakref.WeakKeyDictionary()


def watch(runtime, loop=None):
    """Makes `loop` (default: the running one) poll `runtime` whenever its
    completions wait. Idempotent; await does it by itself."""
    loop = loop or asyncio.get_running_loop()
    fds = _watched.setdefault(loop, {})
    fd = runtime.host_fd()
    if fds.get(fd) is runtime:
        return
    fds[fd] = runtime
    loop.add_reader(fd, runtime.poll)


def unwatch(runtime, loop=None):
    """Stops `loop` polling `runtime` (before the runtime stops, or the loop closes)."""
    loop = loop or asyncio.get_running_loop()
    fds = _watched.get(loop, {})
    fd = runtime.host_fd()
    if fds.pop(fd, None) is not None:
        loop.remove_reader(fd)


def call_future(call):
    """An asyncio future of `call` on the running loop (Call.__await__ uses it)."""
    loop = asyncio.get_running_loop()
    watch(call.runtime, loop)
    future = loop.create_future()
    loop_thread = threading.get_ident()

    def resolve(c):
        if future.cancelled():
            return
        error = c.exception()
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(c.result())

    def on_done(c):
        # poll() normally runs on the loop's own thread (the reader); a host
        # that also polls from another thread hands the result over.
        if threading.get_ident() == loop_thread:
            resolve(c)
        else:
            loop.call_soon_threadsafe(resolve, c)

    call.add_done_callback(on_done)
    return future


__all__ = ["watch", "unwatch", "call_future", "Error"]
