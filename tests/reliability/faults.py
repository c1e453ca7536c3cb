"""File-system fault injection: count, trace, crash at or fail chosen os-level calls made by cb_mobile.

An :class:`Injector` wraps ``os.open``, ``os.write``, ``os.fsync``, ``os.rename``,
``os.replace``, ``os.unlink``, ``os.link`` and their relatives, plus ``open``/``io.open`` in write
modes (whose file objects get a counting ``write``). Only calls made while a
``cb_mobile`` frame is on the stack are counted, so the harness's own journal writes
and pytest's bookkeeping never shift the count. Each counted call becomes an
:class:`Event` with its operation, its 1-based index among calls of that operation, the
``cb_mobile`` functions on the stack and the file involved.

A :class:`FaultSpec` such as ``"rename@evict:3:after"`` picks one of those calls: the
3rd ``rename`` made while a ``cb_mobile`` function whose name contains ``evict`` is on
the stack, hit after the real call returned. ``before`` hits the call before it runs;
``mid`` (write and writev only) writes the first half of the data and then hits. What a hit does
is the injector's ``action``: the crash worker sends itself SIGKILL, in-process tests
raise ``OSError(ENOSPC)`` or :class:`SimulatedCrash`.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

OPS = ("open", "write", "writev", "fsync", "fdatasync", "rename", "replace", "unlink", "remove", "rmdir",
       "mkdir", "link", "ftruncate", "truncate")
"""Operations an injector counts. ``open`` counts only opens for writing."""

WHENS = ("before", "after", "mid")

_PACKAGE_MARK = os.sep + "cb_mobile" + os.sep
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

# The real functions, captured before any injector patches them. Harness code that
# must never be counted (journals, markers) calls these.
REAL = {name: getattr(os, name) for name in OPS if hasattr(os, name)}
REAL["io_open"] = io.open
REAL["builtin_open"] = builtins.open


class SimulatedCrash(BaseException):
    """Raised by an in-process injector to abandon a call the way a crash would.

    It derives from BaseException so that ``except Exception`` handlers in the code
    under test do not turn it into an ordinary error.
    """


@dataclass(frozen=True)
class FaultSpec:
    """Which counted call to hit.

    Attributes
    ----------
    op : str
        One of :data:`OPS`.
    n : int
        1-based index among the calls that match ``op`` and ``where``.
    where : str or None
        Substring of a ``cb_mobile`` function name that must be on the stack.
    when : str
        ``before``, ``after`` or ``mid`` (``mid`` only for ``write``).
    """

    op: str
    n: int
    where: str | None = None
    when: str = "before"

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown fault operation {self.op!r}; expected one of {', '.join(OPS)}")
        if self.n < 1:
            raise ValueError(f"fault index must be >= 1, got {self.n}")
        if self.when not in WHENS or (self.when == "mid" and self.op not in ("write", "writev")):
            raise ValueError(f"invalid fault timing {self.when!r} for {self.op!r}")

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """Parse ``OP[@WHERE]:N[:WHEN]``, for example ``fsync:7`` or ``unlink@gc:2:after``."""
        parts = text.strip().split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"invalid fault spec {text!r}; expected OP[@WHERE]:N[:WHEN]")
        op, _, where = parts[0].partition("@")
        when = parts[2] if len(parts) == 3 else "before"
        return cls(op, int(parts[1]), where or None, when)

    def __str__(self) -> str:
        where = f"@{self.where}" if self.where else ""
        return f"{self.op}{where}:{self.n}:{self.when}"


@dataclass(frozen=True)
class Event:
    """One counted call."""

    op: str
    index: int
    functions: tuple[str, ...]
    path: str

    @property
    def function(self) -> str:
        """Innermost cb_mobile function on the stack."""
        return self.functions[0] if self.functions else "?"


def _cb_mobile_functions() -> tuple[str, ...]:
    """Return the cb_mobile functions on the caller's stack, innermost first, as ``module.qualname``."""
    names = []
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if _PACKAGE_MARK in filename:
            module = os.path.splitext(os.path.basename(filename))[0]
            names.append(f"{module}.{frame.f_code.co_qualname}")
        frame = frame.f_back
    return tuple(names)


def _is_write_mode(mode: object, flags: int | None = None) -> bool:
    """Return whether an open call can modify the file."""
    if flags is not None:
        return bool(flags & _WRITE_FLAGS)
    return isinstance(mode, str) and any(letter in mode for letter in "wax+")


class _CountingFile:
    """File object proxy whose ``write`` is a counted operation."""

    def __init__(self, injector: Injector, handle: Any, path: str) -> None:
        self._injector = injector
        self._handle = handle
        self._path = path

    def write(self, data: Any) -> int:
        handle = self._handle

        def real(chunk: Any) -> int:
            return handle.write(chunk)

        def partial(chunk: Any) -> None:
            view = memoryview(chunk).cast("B") if not isinstance(chunk, str) else chunk
            handle.write(view[: len(view) // 2])
            handle.flush()

        return self._injector.call("write", self._path, real, (data,), partial=partial)

    def __enter__(self) -> _CountingFile:
        self._handle.__enter__()
        return self

    def __exit__(self, *exc: object) -> Any:
        return self._handle.__exit__(*exc)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._handle)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


@dataclass
class Injector:
    """Patches os-level file operations to count, trace and hit one of them.

    Parameters
    ----------
    action : callable
        Called with the :class:`Event` that matches ``spec``. It may raise, or end the
        process; when it returns, the call goes on normally.
    spec : FaultSpec or None
        Which call to hit; None only counts and traces.
    trace : bool
        Keep every counted :class:`Event` in ``events``.
    """

    action: Callable[[Event], None] | None = None
    spec: FaultSpec | None = None
    trace: bool = False
    events: list[Event] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    hit: Event | None = None
    _matched: int = 0
    _fd_paths: dict[int, str] = field(default_factory=dict)
    _installed: bool = False
    _mutex: threading.Lock = field(default_factory=threading.Lock)

    def call(self, op: str, path: str, real: Callable[..., Any], args: tuple[Any, ...],
             kwargs: dict[str, Any] | None = None, partial: Callable[..., None] | None = None) -> Any:
        """Run one wrapped call, counting it and hitting it when it matches the spec."""
        kwargs = kwargs or {}
        functions = _cb_mobile_functions()
        if not functions:
            return real(*args, **kwargs)

        with self._mutex:
            index = self.counts.get(op, 0) + 1
            self.counts[op] = index
            event = Event(op, index, functions, path)
            if self.trace:
                self.events.append(event)
            matched = self._matches(event)

        if not matched:
            return real(*args, **kwargs)

        self.hit = event
        when = self.spec.when
        if when == "before":
            self._act(event)
            return real(*args, **kwargs)
        if when == "mid" and partial is not None:
            partial(*args)
            self._act(event)
            return real(*args, **kwargs)
        result = real(*args, **kwargs)
        self._act(event)
        return result

    def _matches(self, event: Event) -> bool:
        spec = self.spec
        if spec is None or self.hit is not None or event.op != spec.op:
            return False
        if spec.where is not None and not any(spec.where in name for name in event.functions):
            return False
        self._matched += 1
        return self._matched == spec.n

    def _act(self, event: Event) -> None:
        if self.action is not None:
            self.action(event)

    # Wrappers -----------------------------------------------------------------------

    def _wrap_open(self, path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        real = REAL["open"]
        if not _is_write_mode(None, flags):
            return real(path, flags, *args, **kwargs)
        fd = self.call("open", os.fspath(path) if not isinstance(path, int) else str(path), real,
                       (path, flags, *args), kwargs)
        self._fd_paths[fd] = str(path)
        return fd

    def _wrap_write(self, fd: int, data: Any) -> int:
        real = REAL["write"]

        def partial(fd: int, data: Any) -> None:
            view = memoryview(data).cast("B")
            real(fd, view[: len(view) // 2])

        return self.call("write", self._fd_paths.get(fd, f"fd {fd}"), real, (fd, data), partial=partial)

    def _wrap_writev(self, fd: int, buffers: Any) -> int:
        real = REAL["writev"]
        buffers = list(buffers)

        def partial(fd: int, buffers: Any) -> None:
            data = b"".join(bytes(buffer) for buffer in buffers)
            REAL["write"](fd, data[: len(data) // 2])

        return self.call("writev", self._fd_paths.get(fd, f"fd {fd}"), real, (fd, buffers), partial=partial)

    def _wrap_fd_op(self, op: str) -> Callable[..., Any]:
        real = REAL[op]

        def wrapper(fd: int, *args: Any) -> Any:
            return self.call(op, self._fd_paths.get(fd, f"fd {fd}"), real, (fd, *args))

        return wrapper

    def _wrap_path_op(self, op: str) -> Callable[..., Any]:
        real = REAL[op]

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            target = args[-1] if op in ("rename", "replace", "link") else args[0]
            return self.call(op, str(target), real, args, kwargs)

        return wrapper

    def _wrap_io_open(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if not _is_write_mode(mode) or isinstance(file, int):
                return real(file, mode, *args, **kwargs)
            path = os.fspath(file)
            handle = self.call("open", str(path), real, (file, mode, *args), kwargs)
            return _CountingFile(self, handle, str(path))

        return wrapper

    @contextmanager
    def installed(self) -> Iterator[Injector]:
        """Patch the os module and ``open`` for the duration of the block."""
        self.install()
        try:
            yield self
        finally:
            self.uninstall()

    def install(self) -> None:
        """Patch the os module and ``open``; :meth:`uninstall` restores them."""
        if self._installed:
            return
        os.open = self._wrap_open
        os.write = self._wrap_write
        os.writev = self._wrap_writev
        for op in ("fsync", "fdatasync", "ftruncate"):
            if op in REAL:
                setattr(os, op, self._wrap_fd_op(op))
        for op in ("rename", "replace", "unlink", "remove", "rmdir", "mkdir", "link", "truncate"):
            setattr(os, op, self._wrap_path_op(op))
        io.open = self._wrap_io_open(REAL["io_open"])
        builtins.open = self._wrap_io_open(REAL["builtin_open"])
        self._installed = True

    def uninstall(self) -> None:
        """Restore the functions that :meth:`install` patched."""
        if not self._installed:
            return
        for name in OPS:
            if name in REAL:
                setattr(os, name, REAL[name])
        io.open = REAL["io_open"]
        builtins.open = REAL["builtin_open"]
        self._installed = False


def raise_oserror(code: int = errno.ENOSPC) -> Callable[[Event], None]:
    """Return an action that raises ``OSError(code)`` naming the file of the event."""
    def action(event: Event) -> None:
        raise OSError(code, os.strerror(code), event.path)

    return action


def raise_crash(event: Event) -> None:
    """Action that abandons the call with :class:`SimulatedCrash`."""
    raise SimulatedCrash(f"simulated crash at {event.op} #{event.index} in {event.function} ({event.path})")
