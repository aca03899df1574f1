"""C-STORE to a destination AE for the routing workers: one association per batch, contexts built from what
is to be sent, and a fallback to an uncompressed transfer syntax when the destination refuses the
instance's own.

For each (SOP class, transfer syntax) to send we propose three presentation contexts: the instance's own
transfer syntax (sent as the bytes are: no decoding), Explicit VR Little Endian and Implicit VR Little Endian
(every SCP must accept the latter). An instance whose own syntax is refused is converted by the caller's
``convert`` function (decompressed) into the accepted one instead of failing.

The same sending (context choice, fallback, statuses) also runs over associations opened elsewhere
(:meth:`Connection.adopt`): the C-MOVE SCP's sub-association, which pynetdicom opens, and the association a
C-GET arrived on (:mod:`node.net.retrieve`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse import _RQ_TO_MESSAGE

from node.net.scu import MAX_CONTEXTS, Target, no_reactor_reads

FALLBACKS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
WARNING_STATUSES = frozenset({0x0001, 0x0107, 0x0116})


class AssociationFailed(ConnectionError):
    """The destination could not be reached, or rejected or aborted the association."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """An instance to send: a Part-10 file and what it is."""

    path: Path
    sop_class: str
    transfer_syntax: str


@dataclass(frozen=True, slots=True)
class Sent:
    ok: bool
    status: int | None  # the destination's DIMSE status, None when it gave none
    error: str = ""  # why it failed, or the warning status
    transfer_syntax: str = ""  # what went on the wire
    association_lost: bool = False


#: Converts an instance into another transfer syntax; returns the path of the converted Part-10 file.
Convert = Callable[[Outgoing, str], Path]


def contexts_for(items: list[Outgoing]) -> set[tuple[str, str]]:
    """The (SOP class, transfer syntax) pairs to propose for ``items`` (own syntax + the two fallbacks)."""
    pairs: set[tuple[str, str]] = set()
    for it in items:
        pairs.add((it.sop_class, it.transfer_syntax))
        pairs.update((it.sop_class, ts) for ts in FALLBACKS)
    return pairs


def _pdu(items: list[tuple[int, bytes]]) -> bytes:
    """A P-DATA-TF PDU (PS3.8 9.3.5): each PDV item is its length, the context ID, then the data (whose first
    byte is the message control header)."""
    body = b"".join((len(data) + 1).to_bytes(4, "big") + bytes((cid,)) + data for cid, data in items)
    return b"\x04\x00" + len(body).to_bytes(4, "big") + body


def _direct_send(assoc: Association) -> None:
    """Write this association's DIMSE requests straight to its socket.

    pynetdicom hands every P-DATA PDU to its DUL thread through a queue and its state machine, one PDU at a
    time: for a 0.5 MB instance to a peer that takes 16 KB PDUs (DCMTK's default) that is 35 round trips
    through another thread, about half of the CPU a forwarded instance costs. Data transfer does not change
    the association's state (Sta6), so writing the same bytes ourselves is equivalent; everything else
    (association, responses, release, abort) stays pynetdicom's.
    """
    dimse = assoc.dimse
    original = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
        if primitive.MessageIDBeingRespondedTo is not None or sock is None:
            original(primitive, context_id)
            return
        msg = _RQ_TO_MESSAGE[primitive.__class__]()
        msg.primitive_to_message(primitive)
        msg.context_id = context_id
        # pynetdicom leaves the socket blocking without a timeout once connected: a peer that stops reading
        # would hang this thread for good. While we write, a stall of the network timeout raises instead.
        sock.settimeout(assoc.network_timeout)
        try:
            _write(msg, context_id, sock)
        finally:
            sock.settimeout(None)

    def _write(msg: Any, context_id: int, sock: socket.socket) -> None:
        batch: list[bytes] = []
        size = 0
        timer = getattr(assoc.dul, "_idle_timer", None)
        for pdata in msg.encode_msg(context_id, dimse.maximum_pdu_size):
            pdu = _pdu(pdata.presentation_data_value_list)
            batch.append(pdu)
            size += len(pdu)
            if size >= 1 << 18:
                sock.sendall(b"".join(batch))
                batch, size = [], 0
                if timer is not None:
                    timer.restart()  # we are busy sending: not an idle association
        if batch:
            sock.sendall(b"".join(batch))

    dimse.send_msg = send_msg  # type: ignore[method-assign]


def on_connect(event: evt.Event) -> None:
    """``EVT_CONN_OPEN`` handler of an outgoing association: Nagle's algorithm would hold each small PDU (the
    C-STORE command) for the previous one's ACK."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass
class Connection:
    """An association to one destination, opened for a batch (:meth:`open`) and released after it: a
    destination that takes one association at a time would otherwise keep the other workers waiting."""

    target: Target
    calling_aet: str
    timeout: float = 30
    max_pdu: int = 0
    assoc: Association | None = None
    accepted: dict[tuple[str, str], bool] = field(default_factory=dict)
    message_id: int = 0
    #: Move Originator AE title and message ID (a C-STORE on behalf of a C-MOVE; REST's ``MoveOriginatorAet``).
    originator: tuple[str, int] | None = None

    def open(self, items: list[Outgoing]) -> None:
        """Associate, proposing the contexts ``items`` need."""
        needed = contexts_for(items)
        self.close()
        if len(needed) > MAX_CONTEXTS:
            raise ValueError(f"{len(needed)} presentation contexts needed; at most {MAX_CONTEXTS} per association")
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = self.timeout
        ae.maximum_pdu_size = self.max_pdu
        for sop_class, ts in sorted(needed):
            ae.add_requested_context(sop_class, ts)
        assoc = ae.associate(self.target.host, self.target.port, ae_title=self.target.aet,
                             evt_handlers=[(evt.EVT_CONN_OPEN, on_connect)])  # fmt: skip
        if not assoc.is_established:
            if assoc.is_rejected:
                raise AssociationFailed(f"association rejected by {self.target}")
            if assoc.is_aborted:
                raise AssociationFailed(f"no connection to {self.target}, or it aborted the association")
            raise AssociationFailed(f"no connection to {self.target}")
        self.adopt(assoc)

    def adopt(self, assoc: Association, *, acceptor: bool = False) -> None:
        """Send over an association established elsewhere; whoever opened it also releases it.

        As requestor (pynetdicom's C-MOVE sub-association, or :meth:`open`'s own) only C-STOREs go out on it, so
        the reactor and the direct socket writes are safe. As ``acceptor`` (the association a C-GET came on) only
        the storage contexts on which the peer let us be the SCU count, and pynetdicom keeps the socket: its
        pending C-GET responses are written by the DUL thread, which direct writes would interleave with.
        """
        if not acceptor:
            no_reactor_reads(assoc)
            _direct_send(assoc)
        self.assoc = assoc
        self.accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]): True for cx in assoc.accepted_contexts
                         if not acceptor or cx.as_scu}  # fmt: skip
        self.message_id = 0

    def send(self, item: Outgoing, convert: Convert, msg_id: int | None = None) -> Sent:
        """C-STORE one instance (of the items :meth:`open` was given); ``msg_id`` overrides our own counter (a
        C-GET's sub-operations take IDs that cannot collide with the requestor's outstanding C-GET)."""
        assoc = self.assoc
        if assoc is None or not assoc.is_established:
            return Sent(False, None, "association lost", association_lost=True)
        syntax = item.transfer_syntax
        path = item.path
        if (item.sop_class, syntax) not in self.accepted:
            fallback = next((ts for ts in FALLBACKS if (item.sop_class, ts) in self.accepted), None)
            if fallback is None:
                offered = ", ".join(sorted({syntax, *FALLBACKS}))
                return Sent(False, None, f"{self.target} accepts SOP class {item.sop_class} in none of {offered}")
            try:
                path = convert(item, fallback)
            except Exception as exc:  # noqa: BLE001 - reported on the row: the destination needs another syntax
                return Sent(False, None, f"{self.target} refused {syntax}; converting to {fallback} failed: {exc}")
            syntax = fallback
        self.message_id = msg_id if msg_id is not None else self.message_id % 65535 + 1
        try:
            originator_aet, originator_id = self.originator or (None, None)
            status = assoc.send_c_store(path, msg_id=self.message_id, originator_aet=originator_aet,
                                        originator_id=originator_id)  # fmt: skip
        except (TimeoutError, ConnectionError, BrokenPipeError) as exc:  # the peer stopped reading or went away
            assoc.abort()
            return Sent(False, None, f"sending failed: {type(exc).__name__}: {exc}", syntax, association_lost=True)
        except Exception as exc:  # noqa: BLE001 - anything pynetdicom raises for this instance is its failure
            lost = not assoc.is_established
            return Sent(False, None, f"{type(exc).__name__}: {exc}", syntax, association_lost=lost)
        finally:
            if path != item.path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # the decompressed copy
        code = getattr(status, "Status", None)
        if code is None:
            lost = not assoc.is_established
            return Sent(False, None, "no response (association aborted or timed out)", syntax, association_lost=lost)
        if code == 0:
            return Sent(True, 0, "", syntax)
        if code in WARNING_STATUSES or 0xB000 <= code <= 0xBFFF:
            return Sent(True, code, f"warning 0x{code:04X}", syntax)
        comment = str(getattr(status, "ErrorComment", "") or "").strip()
        return Sent(False, code, f"status 0x{code:04X} {comment}".strip(), syntax)

    def close(self) -> None:
        if self.assoc is not None:
            if self.assoc.is_established:
                self.assoc.release()
            self.assoc = None
        self.accepted = {}


def quiet_pynetdicom() -> None:
    """Workers log their own events; pynetdicom's per-PDU logging only costs time (and it logs a refused
    connection as an ERROR with a traceback-like dump every retry)."""
    _config.LOG_HANDLER_LEVEL = "none"
    _config.STORE_SEND_CHUNKED_DATASET = True
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
