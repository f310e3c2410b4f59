"""What `models` says about a model (read from the GGUF itself), the expected-dimension guard,
and where the GPU setting goes. No GPU here: the offload path is checked up to llama.cpp's
model parameters, which is as far as a CPU-only build lets it go."""

from __future__ import annotations

import hashlib
from pathlib import Path

import llama_cpp

from embedd.inference.engine import ALL_LAYERS, gpu_layers_for, model_params
from tests.conftest import BUNDLED, Daemon, start_daemon


def test_models_shows_the_card_of_a_loaded_model(daemon: Daemon) -> None:
    daemon.call("load")
    card = {m["name"]: m for m in daemon.call("models")["models"]}["default"]
    assert card["architecture"] == "bert" and card["causal"] is False
    assert card["quantization"] == "F16"
    assert card["size"] == BUNDLED.stat().st_size
    assert card["sha256"] == hashlib.sha256(BUNDLED.read_bytes()).hexdigest()
    assert card["model_name"] == "MiniLM L6 H384 Uncased"  # general.name from the GGUF
    assert card["license"] == "apache-2.0"
    assert (card["n_ctx_train"], card["max_tokens"], card["dim"]) == (512, 256, 384)
    assert card["layers"] == 6 and card["runs_on"] == "cpu" and card["gpu_layers"] == 0
    assert card["fingerprint"]


def test_a_model_whose_dimension_differs_from_the_configured_one_refuses_to_load(
    workdir: Path, own_daemon: list[Daemon]
) -> None:
    d = start_daemon(workdir, "[models.default]\npath = '{bundled}'\ndim = 768\n")
    own_daemon.append(d)
    err = d.call("embed", input="x")["error"]
    assert err["code"] == "model_load_failed"
    assert "384" in err["message"] and "dim = 768" in err["message"]


def test_gpu_layers_default_to_all_with_gpu_offload_and_none_without() -> None:
    assert gpu_layers_for(None, supports_gpu=True) == ALL_LAYERS
    assert gpu_layers_for(None, supports_gpu=False) == 0
    assert gpu_layers_for(12, supports_gpu=True) == 12


def test_the_gpu_setting_reaches_llama_cpps_model_parameters() -> None:
    # A fake only in that no GPU exists here: these are the real llama.cpp parameters.
    params = model_params(gpu_layers_for(12, supports_gpu=True))
    assert params.n_gpu_layers == 12
    assert params.load_mode == llama_cpp.LLAMA_LOAD_MODE_NONE  # read, not mapped (SIGBUS)
