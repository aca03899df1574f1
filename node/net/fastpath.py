"""Event-driven waiting for pynetdicom's acceptor threads (less latency per C-STORE, no idle spinning).

pynetdicom runs two polling loops per association: the DUL thread sleeps 1 ms whenever it has nothing to do,
and the association thread sleeps 1 ms before each look at its message queue.  A C-STORE therefore waits up to
a millisecond at each hand-over (request in, response out), and every idle association wakes 2,000 times a
second.  We keep pynetdicom's state machine and DIMSE code untouched and change only *how they wait*:

* the DUL waits in ``select()`` on its socket and on an eventfd that :meth:`send_pdu` signals, so it wakes the
  moment the peer sends data or a response is queued;
* the DIMSE provider's non-blocking ``get_msg`` (only the association's reactor calls it) waits up to 10 ms for
  a message instead of returning at once, so the reactor picks a request up as soon as it is complete.

Both are installed on the acceptor's objects by :class:`FastRequestHandler` (pynetdicom's documented
``request_handler`` hook of its association server).  ``tests/test_scp.py`` pins the pynetdicom behaviour this
relies on.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import weakref
from typing import Any

from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import RequestHandler

_IDLE_WAIT_S = 0.05  # longest DUL wait: ARTIM expiry is noticed within this
_MSG_WAIT_S = 0.01  # longest reactor wait: release/abort/idle-timeout checks run at least this often


class _EventDUL(DULServiceProvider):
    _wake_fd: int
    _wake_close: weakref.finalize

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake_fd, 1)

    def _process_recv_primitive(self) -> bool:
        if super()._process_recv_primitive():
            return True
        # Nothing to send: if nothing is pending either, wait for the peer or for a primitive to send.
        sock = getattr(self.socket, "socket", None)
        if sock is not None and self.event_queue.empty() and self.to_provider_queue.empty():
            try:
                ready, _, _ = select.select([sock, self._wake_fd], [], [], _IDLE_WAIT_S)
            except (OSError, ValueError):
                return False  # socket closed under us: pynetdicom's own checks take it from here
            if self._wake_fd in ready:
                with contextlib.suppress(OSError):
                    os.eventfd_read(self._wake_fd)
        return False

    def stop_dul(self) -> bool:
        stopped = super().stop_dul()
        if stopped:
            self._wake_close()  # a weakref.finalize: closes the fd once, whoever gets there first
        return stopped


class _EventDIMSE(DIMSEServiceProvider):
    def get_msg(self, block: bool = False) -> Any:
        if block:
            return super().get_msg(block=True)
        try:
            return self.msg_queue.get(block=True, timeout=_MSG_WAIT_S)
        except queue.Empty:
            return None, None


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def make_event_driven(assoc: Any) -> None:
    """Switch a freshly created acceptor association to event-driven waiting (before its threads start)."""
    dul = assoc.dul
    dul.__class__ = _EventDUL
    dul._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    dul._wake_close = weakref.finalize(dul, _close, dul._wake_fd)  # also runs if stop_dul is never reached
    dul._run_loop_delay = 0  # the wait happens in select() above
    assoc.dimse.__class__ = _EventDIMSE


class FastRequestHandler(RequestHandler):
    """pynetdicom's request handler, with event-driven waiting on the association it creates."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        make_event_driven(assoc)
        return assoc
