"""Scale-out on an existing router: LiteLLM's proxy (least-busy routing) in front of two `npulm serve` processes on
loopback. Requests spread over both; one server killed mid-run, the proxy keeps answering from the other.

LiteLLM is found as $NPULM_LITELLM or `litellm` on PATH (CI installs it into its own virtual environment: its
dependency pins are not npulm's); without it the test skips."""

from __future__ import annotations

import concurrent.futures as cf
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
LITELLM = os.environ.get("NPULM_LITELLM") or shutil.which("litellm")
pytestmark = [pytest.mark.scaleout,
              pytest.mark.skipif(not LITELLM, reason="needs LiteLLM's proxy (pip install 'litellm[proxy]')")]

CONFIG = """
model_list:
{deployments}
router_settings:
  routing_strategy: least-busy
  num_retries: 3
  retry_after: 0
  allowed_fails: 1
  cooldown_time: 60
  timeout: 60
litellm_settings:
  drop_params: true
general_settings:
  master_key: os.environ/LITELLM_MASTER_KEY
"""
KEY = "sk-npulm-scaleout-test"  # the proxy refuses to start without a master key
DEPLOYMENT = """  - model_name: tiny
    litellm_params:
      model: openai/tiny
      api_base: {url}/v1
      api_key: none
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer")


def served(url: str) -> int:
    """Chat completions a server answered, from its /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return int(sum(float(v) for v in re.findall(
        r'npulm_requests_total\{route="/v1/chat/completions",status="200"\} (\S+)', text)))


def test_litellm_spreads_requests_and_survives_a_dead_server(tiny_models, tmp_path):
    procs: list[subprocess.Popen] = []
    try:
        urls = []
        for _ in range(2):
            port = free_port()
            procs.append(subprocess.Popen([sys.executable, "-m", "npulm.cli", "serve", "-m", str(tiny_models["llama"]),
                                           "--port", str(port), "-np", "2", "-c", "256", "--alias", "tiny"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(urls, procs):
            wait_http(url + "/health", proc)
        config = tmp_path / "litellm.yaml"
        config.write_text(CONFIG.format(deployments="".join(DEPLOYMENT.format(url=u) for u in urls)))
        port = free_port()
        proxy = subprocess.Popen([LITELLM, "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env={**os.environ, "LITELLM_TELEMETRY": "False", "LITELLM_LOG": "ERROR",
                                      "LITELLM_MASTER_KEY": KEY})
        procs.append(proxy)
        wait_http(f"http://127.0.0.1:{port}/health/liveliness", proxy)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=120)

        def ask(i: int) -> str:
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"the cat {i}"}],
                                               max_tokens=48, temperature=0)
            return r.choices[0].message.content

        with cf.ThreadPoolExecutor(8) as pool:
            assert all(isinstance(x, str) for x in pool.map(ask, range(16)))
            counts = [served(u) for u in urls]
            assert sum(counts) >= 16 and min(counts) >= 3, counts  # spread over both
            # kill one server while requests are in flight: the proxy retries on the other one
            futures = [pool.submit(ask, i) for i in range(16, 28)]
            time.sleep(0.2)
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait(10)
            futures += [pool.submit(ask, i) for i in range(28, 40)]
            answers = [f.result() for f in futures]
        assert len(answers) == 24 and all(isinstance(x, str) for x in answers)
        assert served(urls[1]) > counts[1]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
