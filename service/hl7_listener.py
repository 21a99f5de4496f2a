"""The node's HL7 v2 listener (MLLP over TCP) for the hospital's feeds: each message is read,
applied (ADT: :mod:`service.hl7_adt`; orders: :mod:`service.hl7_prefetch`) and answered with an
original-mode acknowledgement once the change is made, so an ACK with AA to an ADT message
means the archive holds the patient as the HIS does.

Each connection's messages are applied in the order they arrive, and ADT messages one at a time
whatever connection they come on (a merge must not overtake the update before it on another).
A message is idempotent: one the HIS sends again because its ACK was late changes nothing the
second time.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import hl7.mllp

from service import hl7_adt, hl7_message, hl7_prefetch, tls
from service.hl7_message import Hl7Error

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 1 << 20


class Hl7Listener:
    """Serves the HL7 feeds a node's ``settings`` ask for (``hl7_port``, or ``port`` when
    given: 0 picks a free one, see :attr:`port`) from a thread of its own: ADT messages always,
    order messages when ``hl7_prefetch`` names destinations. ``count`` (ack code) is called
    once per message answered."""

    def __init__(self, archive, settings, count=None, port: int | None = None):
        self.archive, self.settings = archive, settings
        self.host, self._port = settings.host, settings.hl7_port if port is None else port
        self.count = count or (lambda code: None)
        self._apply_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def senders(self) -> set[str]:
        """``hl7_senders`` as the settings stand (a reload on SIGHUP changes them)."""
        return {s.strip() for s in self.settings.hl7_senders.split(",") if s.strip()}

    @property
    def prefetch(self) -> dict[str, int]:
        """``hl7_prefetch`` as the settings stand: {destination: studies}."""
        return hl7_prefetch.parse_targets(self.settings.hl7_prefetch)

    @property
    def port(self) -> int:
        """The TCP port the listener is bound to."""
        return self._server.sockets[0].getsockname()[1]

    def start(self) -> "Hl7Listener":
        """Bind and serve in the background; raise OSError when the port cannot be bound."""
        ready, failed = threading.Event(), []
        self._thread = threading.Thread(target=self._run, args=(ready, failed),
                                        name="voxarc-hl7", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            raise failed[0]
        log.info("HL7 listener on %s:%d (%sADT%s)", self.host, self.port,
                 "TLS, " if self.settings.hl7_tls else "",
                 ", orders and appointments" if self.prefetch else "")
        return self

    def _run(self, ready: threading.Event, failed: list) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._server = self._loop.run_until_complete(hl7.mllp.start_hl7_server(
                self._serve, self.host, self._port, limit=MAX_MESSAGE_BYTES, ssl=self._tls()))
        except (OSError, ValueError) as exc:      # a port in use, a certificate it cannot load
            failed.append(exc)
            ready.set()
            self._loop.close()
            return
        ready.set()
        self._loop.run_forever()
        self._loop.close()

    def _tls(self):
        """The TLS context of ``hl7_tls`` (the DICOM listener's certificates), or None."""
        if not self.settings.hl7_tls:
            return None
        return tls.server_context(self.settings.tls_certificate, self.settings.tls_private_key,
                                  self.settings.tls_ca_certificates)

    def stop(self) -> None:
        """Stop listening; a message being applied is finished first."""
        if self._loop is None or self._thread is None:
            return

        async def close():
            self._server.close()
            await self._server.wait_closed()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:                # connections waiting for their next message
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            self._loop.stop()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(close(), self._loop)
        self._thread.join(timeout=60)
        with self._apply_lock:        # a message being applied in the executor
            pass

    async def _serve(self, reader, writer) -> None:
        peer = writer.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if peer else "?"
        try:
            while True:
                try:
                    block = await reader.readblock()
                except (asyncio.IncompleteReadError, ConnectionError):
                    break                      # the sender closed the connection
                except (ValueError, hl7.mllp.InvalidBlockError) as exc:
                    log.warning("HL7 from %s: %s; connection closed", where, exc)
                    break
                answer = await asyncio.get_running_loop().run_in_executor(
                    None, self.handle, block, where)
                writer.writeblock(answer)
                await writer.drain()
        finally:
            writer.close()

    def handle(self, block: bytes, where: str = "?") -> bytes:
        """Apply one message (the bytes of an MLLP block) and return its acknowledgement."""
        msg = None
        try:
            msg = hl7_message.decode(block, self.settings.hl7_charset)
            head = hl7_message.header(msg)
            if self.senders and head.sender.split("@")[0] not in self.senders:
                raise Hl7Error("AR", f"sending application {head.sender!r} is not one of "
                                     "hl7_senders")
            if head.kind == "ADT":
                done = self._adt(msg)
            elif hl7_prefetch.is_order(head) and (targets := self.prefetch):
                order = hl7_prefetch.read_order(msg, self.settings.hl7_patient_id_authority)
                done = hl7_prefetch.prefetch(self.archive, order, targets)
            else:
                raise Hl7Error("AR", f"message type {head.kind}^{head.event} is not taken "
                                     "(ADT; orders and SIU when hl7_prefetch is set)")
            log.info("HL7 %s^%s %s from %s (%s): %s", head.kind, head.event, head.control_id,
                     head.sender, where, "; ".join(done))
            return self._answer(msg, "AA", "")
        except Hl7Error as exc:
            log.warning("HL7 message from %s answered %s: %s", where, exc.code, exc)
            return self._answer(msg, exc.code, str(exc))
        except Exception as exc:      # the HIS must hear of it; the next message still goes
            log.exception("HL7 message from %s failed", where)
            return self._answer(msg, "AE", f"internal error: {exc}")

    def _adt(self, msg) -> list[str]:
        adt = hl7_adt.read_message(msg, self.settings.hl7_patient_id_authority)
        if not adt.changes:
            return ["not an update or merge, passed over"]
        with self._apply_lock:
            return hl7_adt.apply(self.archive, adt, self.settings.hl7_resend)

    def _answer(self, msg, code: str, text: str) -> bytes:
        self.count(code)
        return hl7_message.ack(msg, code, text)
