"""The admin web application served by uvicorn in a background thread beside the DICOM node."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time

import uvicorn

from service.web import create_app

log = logging.getLogger(__name__)
TOKEN_ENV = "VOXARC_HTTP_TOKEN"


class AdminServer:
    """Serve an ASGI application on ``host:port`` from a daemon thread.

    Parameters
    ----------
    app : ASGI application
    host : str
        Address to bind (``127.0.0.1`` keeps the page local to the machine).
    port : int
        TCP port; 0 picks a free one (see :attr:`port`).
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 8042):
        self.host = host
        # No access log: uvicorn's would print query strings, which may hold the token.
        config = uvicorn.Config(app, host=host, port=port, lifespan="off", access_log=False,
                                log_config=None, log_level="warning", server_header=False)
        self.server = uvicorn.Server(config)
        self._socket = self._bind(host, port)
        self._thread = threading.Thread(target=self.server.run, name="voxarc-http",
                                        kwargs={"sockets": [self._socket]}, daemon=True)

    @staticmethod
    def _bind(host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        return sock

    @property
    def port(self) -> int:
        """The TCP port the server is bound to."""
        return self._socket.getsockname()[1]

    @property
    def url(self) -> str:
        """Base URL of the page."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "AdminServer":
        """Start serving; return once the server accepts connections.

        Raises
        ------
        RuntimeError
            When the server has not started within ``timeout`` seconds.
        """
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"admin web server did not start on {self.url}")
            time.sleep(0.02)
        log.info("admin page on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._socket.close()


def token_from_env(settings) -> None:
    """Give ``settings`` the token of :data:`TOKEN_ENV` when they name none."""
    if not settings.http_token and os.environ.get(TOKEN_ENV):
        settings.http_token = os.environ[TOKEN_ENV]


def start_admin(node) -> AdminServer:
    """Serve the admin page of a running :class:`service.ae.Node` as its settings say.

    The token is ``http_token`` from the settings or, when that is empty, the environment
    variable ``VOXARC_HTTP_TOKEN`` (so that it need not appear on a command line).
    """
    token_from_env(node.settings)
    settings = dataclasses.replace(node.settings, port=node.port)    # the port bound, not 0
    app = create_app(node.archive, settings, node.metrics, access=node.settings)
    return AdminServer(app, settings.http_host, settings.http_port).start()
