"""Helpers for the server tests: a real server process on a free port, WebSocket clients."""
import json
import os
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m asd_deploy serve ...` on a free port, logging to `log`; stopped by `stop()`."""

    def __init__(self, log_path, *args, timeout=180):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/v1/stream"
        self.log_path = log_path
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "asd_deploy", "serve", "--port", str(self.port),
                                      "--log-level", "warning", *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not answer /healthz within {timeout} s:\n{self.log()}")
            time.sleep(0.3)

    def log(self) -> str:
        self._log.flush()
        return open(self.log_path).read()[-4000:]

    def health(self) -> dict:
        return httpx.get(self.url + "/healthz", timeout=10).json()

    def wait_active(self, n, timeout=15.0):
        deadline = time.time() + timeout
        while (active := self.health()["streams_active"]) != n:
            assert time.time() < deadline, f"streams_active stayed {active}, expected {n}"
            time.sleep(0.1)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


def ws_stream(url, start: dict, on_chunk=None, timeout=120):
    """Run one WebSocket stream to its end: (messages, {chunk index: [frame bytes]}, close code).
    on_chunk(ws, header) is called after each chunk header (e.g. to switch the prompt)."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    messages, frames, current = [], {}, None
    with connect(url, open_timeout=30, max_size=None) as ws:
        ws.send(json.dumps(start))
        deadline = time.time() + timeout
        try:
            while time.time() < deadline:
                m = ws.recv(timeout=timeout)
                if isinstance(m, bytes):
                    frames[current].append(m)
                    continue
                msg = json.loads(m)
                messages.append(msg)
                if msg["type"] == "chunk":
                    current = msg["index"]
                    frames[current] = []
                    if on_chunk:
                        on_chunk(ws, msg)
        except ConnectionClosed:
            pass
        code = ws.close_code
    return messages, frames, code
