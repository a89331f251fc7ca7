"""End to end through a real trace viewer: Arize Phoenix on loopback, spans of a run that crosses
a spawned worker process exported over OTLP/HTTP and read back through Phoenix's REST API.

Skipped when Phoenix is not installed. The server is the executable named by
``ESPER_PHOENIX_BIN`` (Phoenix in its own virtual environment, e.g. ``.venv-phoenix/bin/phoenix``:
the recommended set-up), or else ``python -m phoenix.server.main`` of this interpreter when
``arize-phoenix`` is installed here. Installed here, Phoenix registers a pytest plugin that warns
on import, which this suite's ``filterwarnings = error`` turns into a start-up error: run pytest
with ``-p no:phoenix`` then.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from esper_async.telemetry import (
    SPAN_COMPILE,
    SPAN_COMPILE_WORKER,
    SPAN_EPOCH,
    SPAN_RUN,
    SPAN_VALIDATE,
    Telemetry,
    TelemetryConfig,
    inject_context,
    read_span_records,
)

from ._worker import run_worker

#: Phoenix takes ~20 s to start on 2 cores (database migrations, UI assets).
START_TIMEOUT_S = 180.0
#: Phoenix ingests OTLP asynchronously; spans show up in its API shortly after the export.
INGEST_TIMEOUT_S = 60.0
EXPECTED = (SPAN_RUN, SPAN_EPOCH, SPAN_COMPILE, SPAN_COMPILE_WORKER, SPAN_VALIDATE)


def _phoenix_command() -> list[str]:
    # Never import phoenix here: importing it warns (DeprecationWarning from ldap3/pyasn1), which
    # this suite turns into errors. The server runs in its own process.
    if exe := os.environ.get("ESPER_PHOENIX_BIN"):
        if not Path(exe).is_file():
            pytest.fail(f"ESPER_PHOENIX_BIN={exe!r} is not a file")
        return [exe, "serve"]
    if importlib.util.find_spec("phoenix") is not None:
        return [sys.executable, "-m", "phoenix.server.main", "serve"]
    pytest.skip(
        "Arize Phoenix is not installed: pip install arize-phoenix (or set ESPER_PHOENIX_BIN)"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
            return response.status, json.loads(body) if body.startswith((b"{", b"[")) else body
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, None


@dataclass
class Phoenix:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Phoenix]:
    command = _phoenix_command()
    workdir = tmp_path_factory.mktemp("phoenix")
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
        "PHOENIX_TELEMETRY_ENABLED": "false",
        "PHOENIX_HOST": "127.0.0.1",
        "PHOENIX_PORT": str(port),
        "PHOENIX_GRPC_PORT": str(_free_port()),
        "PHOENIX_WORKING_DIR": str(workdir),
    }
    log = workdir / "phoenix.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Phoenix(url=f"http://127.0.0.1:{port}", process=process, log=log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while _get(server.url + "/healthz")[0] != 200:
            if process.poll() is not None:
                pytest.fail(f"phoenix exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"phoenix not ready after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _flatten(attributes: Any, prefix: str = "") -> dict[str, Any]:
    """Phoenix may return dotted names nested (``{"esper": {"slot": ...}}``); flatten them."""
    if not isinstance(attributes, dict):
        return {prefix[:-1]: attributes}
    out: dict[str, Any] = {}
    for key, value in attributes.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def _phoenix_spans(server: Phoenix, project: str) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + INGEST_TIMEOUT_S
    spans: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        status, body = _get(f"{server.url}/v1/projects/{project}/spans?limit=100")
        if status == 200:
            spans = {s["name"]: s for s in body["data"]}
            if set(EXPECTED) <= set(spans):
                return spans
        time.sleep(0.5)
    pytest.fail(f"Phoenix has spans {sorted(spans)} of project {project}, expected {EXPECTED}")


def test_a_run_crossing_a_worker_process_is_one_trace_in_phoenix(
    phoenix: Phoenix, tmp_path: Path
) -> None:
    project = f"esper-test-{uuid.uuid4().hex[:8]}"
    config = TelemetryConfig(
        otlp_endpoint=phoenix.url,
        resource_attributes={"openinference.project.name": project},
    )
    with Telemetry.create(run_dir=tmp_path, config=config, run_id=project) as tel:
        with tel.span(SPAN_RUN), tel.span(SPAN_EPOCH, epoch=0):
            with tel.span(SPAN_COMPILE, blueprint="conv3x3"):
                assert run_worker(tel, inject_context()) == 0

    spans = _phoenix_spans(phoenix, project)
    ids = {name: (s["context"]["trace_id"], s["context"]["span_id"]) for name, s in spans.items()}
    parents = {name: s.get("parent_id") for name, s in spans.items()}

    assert len({trace_id for trace_id, _ in ids.values()}) == 1, "one trace across both processes"
    assert parents[SPAN_RUN] is None
    assert parents[SPAN_EPOCH] == ids[SPAN_RUN][1]
    assert parents[SPAN_COMPILE] == ids[SPAN_EPOCH][1]
    assert parents[SPAN_COMPILE_WORKER] == ids[SPAN_COMPILE][1]  # the cross-process link
    assert parents[SPAN_VALIDATE] == ids[SPAN_COMPILE_WORKER][1]

    worker_attrs = _flatten(spans[SPAN_COMPILE_WORKER]["attributes"])
    assert worker_attrs["esper.blueprint"] == "conv3x3"
    assert int(worker_attrs["esper.worker.pid"]) != os.getpid()

    # Phoenix saw the same spans the JSON-lines files hold.
    local = {r.name: (r.trace_id, r.span_id) for r in read_span_records(tmp_path)}
    assert {name: local[name] for name in EXPECTED} == {name: ids[name] for name in EXPECTED}
