"""A real npulm server (uvicorn on 127.0.0.1, a free port) in a thread of the test process, on a tiny model."""

from __future__ import annotations

import argparse
import socket
import threading
import time

import pytest

pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, model: str, **options):
        import uvicorn

        from npulm.server import build

        args = argparse.Namespace(model=model, ctx_size=256, batch_size=8, threads=None, npu_layers="0", pipeline=None,
                                  override_tensor=None, chip=None, parallel=4, max_queue=64, prefix_cache=True,
                                  alias="tiny", api_key=None, max_body=1 << 16)
        for k, v in options.items():
            setattr(args, k, v)
        if "ctx_size" not in options:  # -c is the total over the slots: 256 tokens each
            args.ctx_size = 256 * args.parallel
        self.app = build(args)
        self.state = self.app.state.npulm
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(tiny_models):
    s = RunningServer(str(tiny_models["llama"]))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed_server(tiny_models):
    s = RunningServer(str(tiny_models["llama"]), api_key="sesame", parallel=1)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tool_server(tiny_models):
    """A server with room for a tool prompt (the tiny model's vocabulary spells it letter by letter)."""
    s = RunningServer(str(tiny_models["llama"]), ctx_size=2048, parallel=1)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def start_server():
    """RunningServer itself, for tests that need other options (call .stop() when done)."""
    return RunningServer
