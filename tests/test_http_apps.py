"""What apps that switch by a base URL meet on the HTTP front: over-long inputs handled by the
model's `http_long` and reported, embedd's options from `extra_body`, unknown keys refused,
errors in each API's shape, aliases listed, CORS for configured origins only."""

from __future__ import annotations

import http.client
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import openai
import pytest

from tests.conftest import (
    Daemon,
    Reference,
    cosines,
    free_port,
    short_tmpdir,
    start_daemon,
    vectors,
)

ORIGIN = "http://localhost:5173"
CONFIG = f"""
cors_origins = ["{ORIGIN}"]
[models.default]
path = "{{bundled}}"
max_tokens = 256
aliases = ["text-embedding-3-small"]
[models.cutter]
path = "{{bundled}}"
max_tokens = 256
http_long = "truncate"
[models.strict]
path = "{{bundled}}"
max_tokens = 256
http_long = "error"
"""


@dataclass(frozen=True)
class Front:
    daemon: Daemon
    port: int
    key: str

    @property
    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key=self.key, max_retries=0
        )

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers=headers or {})
        reply = conn.getresponse()
        raw = reply.read()
        conn.close()
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, parsed

    def authed(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def front() -> Iterator[Front]:
    workdir = short_tmpdir()
    port = free_port()
    d = start_daemon(
        workdir,
        CONFIG,
        extra_args=("--http", f"127.0.0.1:{port}", "--api-key-file", str(workdir / "key")),
    )
    yield Front(d, port, (workdir / "key").read_text().strip())
    d.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def long_text(reference: Reference) -> str:
    return "\n\n".join(reference.chunks[:5])  # ~800 tokens: several windows


def test_an_over_long_input_is_split_by_default_and_the_answer_says_so(
    front: Front, long_text: str
) -> None:
    raw = front.openai.embeddings.with_raw_response.create(
        model="default", input=["short", long_text], encoding_format="float"
    )
    answer = json.loads(raw.text)
    split = front.daemon.call("embed", input=["short", long_text], long="split")
    assert split["windows"][1] > 1 and raw.headers["x-embedd-split"] == "1"
    assert answer["embedd"] == {"truncated": [], "windows": {"1": split["windows"][1]}}
    got = np.asarray([d["embedding"] for d in answer["data"]], dtype=np.float32)
    assert cosines(got, vectors(split)).min() >= 0.9999


def test_a_model_whose_http_long_is_truncate_cuts_and_says_so(front: Front, long_text: str) -> None:
    raw = front.openai.embeddings.with_raw_response.create(model="cutter", input=[long_text])
    assert raw.headers["x-embedd-truncated"] == "1"
    assert json.loads(raw.text)["embedd"]["truncated"] == [0]


def test_a_model_whose_http_long_is_error_refuses_naming_the_limit(
    front: Front, long_text: str
) -> None:
    with pytest.raises(openai.BadRequestError, match="limit of 256"):
        front.openai.embeddings.create(model="strict", input=[long_text])


def test_embedds_options_in_extra_body_are_honoured(front: Front, long_text: str) -> None:
    raw = front.openai.embeddings.with_raw_response.create(
        model="strict", input=[long_text], extra_body={"long": "split", "overlap": 32}
    )
    split = front.daemon.call("embed", input=long_text, long="split", overlap=32)
    assert json.loads(raw.text)["embedd"]["windows"] == {"0": split["windows"][0]}


@pytest.mark.parametrize("path", ["/v1/embeddings", "/api/embed"])
@pytest.mark.parametrize("key", ["long", "truncate"])
def test_a_null_long_or_truncate_means_the_models_http_long(
    front: Front, long_text: str, path: str, key: str
) -> None:
    # Clients that serialise unset options as null must get what sending nothing gets.
    body = {"model": "cutter", "input": [long_text], key: None}
    status, headers, answer = front.request("POST", path, body, front.authed())
    assert status == 200, answer
    assert headers["x-embedd-truncated"] == "1" and answer["embedd"]["truncated"] == [0]


def test_an_unknown_body_key_is_refused_naming_it(front: Front) -> None:
    with pytest.raises(openai.BadRequestError, match="unknown key 'normalise'"):
        front.openai.embeddings.create(
            model="default", input=["x"], extra_body={"normalise": False}
        )


def test_the_keys_apps_send_are_accepted(front: Front) -> None:
    status, _, _ = front.request(
        "POST",
        "/api/embed",
        {"model": "default", "input": "x", "options": {}, "keep_alive": "5m"},
        front.authed(),
    )
    assert status == 200
    assert front.openai.embeddings.create(model="default", input=["x"], user="u1").data


def test_a_401_on_the_ollama_api_has_ollamas_shape(front: Front) -> None:
    status, _, body = front.request("POST", "/api/embed", {"model": "default", "input": "x"})
    assert status == 401 and isinstance(body["error"], str) and "OLLAMA_API_KEY" in body["error"]
    status, _, body = front.request("POST", "/v1/embeddings", {"model": "default", "input": "x"})
    assert status == 401 and body["error"]["type"] == "authentication_error"


def test_a_401_to_a_page_of_an_allowed_origin_carries_its_cors_header(front: Front) -> None:
    # Without it the page sees a network error, not "wrong key".
    body = {"model": "default", "input": "x"}
    status, headers, _ = front.request("POST", "/v1/embeddings", body, {"Origin": ORIGIN})
    assert status == 401 and headers["access-control-allow-origin"] == ORIGIN
    status, headers, _ = front.request(
        "POST", "/v1/embeddings", body, {"Origin": "https://evil.example"}
    )
    assert status == 401 and "access-control-allow-origin" not in headers


def test_aliases_are_listed_where_apps_look_for_models(front: Front) -> None:
    names = {m.id for m in front.openai.models.list()}
    assert {"default", "text-embedding-3-small", "cutter"} <= names
    _, _, tags = front.request("GET", "/api/tags", headers=front.authed())
    assert "text-embedding-3-small" in {m["name"] for m in tags["models"]}


def test_a_cors_preflight_from_a_configured_origin_is_allowed(front: Front) -> None:
    status, headers, _ = front.request(
        "OPTIONS",
        "/v1/embeddings",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert status == 204 and headers["access-control-allow-origin"] == ORIGIN
    assert "Authorization" in headers["access-control-allow-headers"]
    status, headers, _ = front.request(
        "POST",
        "/v1/embeddings",
        {"model": "default", "input": "x"},
        {**front.authed(), "Origin": ORIGIN},
    )
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN


def test_a_cors_preflight_from_any_other_origin_is_refused(front: Front) -> None:
    status, headers, body = front.request(
        "OPTIONS", "/v1/embeddings", headers={"Origin": "https://evil.example"}
    )
    assert status == 403 and "cors_origins" in body["error"]["message"]
    assert "access-control-allow-origin" not in headers
