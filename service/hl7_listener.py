"""The node's HL7 v2 listener (MLLP over TCP) for the hospital's ADT feed: each message is read,
applied (:mod:`service.hl7_adt`) and answered with an original-mode acknowledgement once the
change is made, so an ACK with AA means the archive holds the patient as the HIS does.

Messages are applied one at a time in the order they arrive, whatever connection they come on
(a merge must not overtake the update before it). A message is idempotent: one the HIS sends
again because its ACK was late changes nothing the second time.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import hl7.mllp

from service import hl7_adt

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 1 << 20


class Hl7Listener:
    """Serves the ADT feed on ``host``:``port`` (0: a free port, see :attr:`port`) from a
    thread of its own; ``senders`` (MSH-3 application names) limits who may change the
    archive (empty: any); ``authority`` picks the patient identifier (``hl7_adt.read_message``);
    ``count`` (ack code) is called once per message answered; ``charset`` is that of messages
    whose MSH-18 is empty (``hl7_adt.decode``)."""

    def __init__(self, archive, host: str, port: int, senders: str = "", authority: str = "",
                 count=None, charset: str = ""):
        self.archive, self.host, self.authority = archive, host, authority
        self.charset = charset
        self.senders = {s.strip() for s in senders.split(",") if s.strip()}
        self.count = count or (lambda code: None)
        self._port = port
        self._apply_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._thread: threading.Thread | None = None

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
        log.info("HL7 ADT listener on %s:%d", self.host, self.port)
        return self

    def _run(self, ready: threading.Event, failed: list) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._server = self._loop.run_until_complete(hl7.mllp.start_hl7_server(
                self._serve, self.host, self._port, limit=MAX_MESSAGE_BYTES))
        except OSError as exc:
            failed.append(exc)
            ready.set()
            self._loop.close()
            return
        ready.set()
        self._loop.run_forever()
        self._loop.close()

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
            msg = hl7_adt.decode(block, self.charset)
            adt = hl7_adt.read_message(msg, self.authority)
            if self.senders and adt.sender.split("@")[0] not in self.senders:
                raise hl7_adt.AdtError("AR", f"sending application {adt.sender!r} is not one "
                                             "of hl7_senders")
            if not adt.changes:
                log.info("HL7 ADT^%s %s from %s (%s): not an update or merge, passed over",
                         adt.event, adt.control_id, adt.sender, where)
                return self._answer(msg, "AA", "")
            with self._apply_lock:
                done = hl7_adt.apply(self.archive, adt)
            log.info("HL7 ADT^%s %s from %s (%s): %s", adt.event, adt.control_id, adt.sender,
                     where, "; ".join(done))
            return self._answer(msg, "AA", "")
        except hl7_adt.AdtError as exc:
            log.warning("HL7 message from %s answered %s: %s", where, exc.code, exc)
            return self._answer(msg, exc.code, str(exc))
        except Exception as exc:      # the HIS must hear of it; the next message still goes
            log.exception("HL7 message from %s failed", where)
            return self._answer(msg, "AE", f"internal error: {exc}")

    def _answer(self, msg, code: str, text: str) -> bytes:
        self.count(code)
        return hl7_adt.ack(msg, code, text)
