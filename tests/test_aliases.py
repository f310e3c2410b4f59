"""Model aliases: other names for one configured model, answered by its one loaded copy."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedd.config import BUNDLED_ALIASES, ConfigError, load_config
from tests.conftest import Daemon, cosines, start_daemon, vectors


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_a_models_aliases_are_read_from_its_table(tmp_path: Path) -> None:
    cfg = load_config(
        _config(tmp_path, '[models.e5]\npath = "e5.gguf"\naliases = ["text-embedding-3-small"]\n'),
        env={},
    )
    assert cfg.models["e5"].aliases == ("text-embedding-3-small",)


def test_an_alias_that_is_another_models_name_is_refused(tmp_path: Path) -> None:
    text = '[models.a]\npath = "a.gguf"\naliases = ["b"]\n[models.b]\npath = "b.gguf"\n'
    with pytest.raises(ConfigError, match="alias 'b' of model 'a' is a model's name"):
        load_config(_config(tmp_path, text), env={})


def test_one_alias_for_two_models_is_refused(tmp_path: Path) -> None:
    text = (
        '[models.a]\npath = "a.gguf"\naliases = ["x"]\n'
        '[models.b]\npath = "b.gguf"\naliases = ["x"]\n'
    )
    with pytest.raises(ConfigError, match="alias 'x' is given to both 'a' and 'b'"):
        load_config(_config(tmp_path, text), env={})


def test_aliases_must_be_strings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="aliases must be a list of model names"):
        load_config(_config(tmp_path, '[models.a]\npath = "a.gguf"\naliases = [1]\n'), env={})


def test_the_bundled_model_answers_the_names_apps_send_for_it(daemon: Daemon) -> None:
    plain = daemon.call("embed", input="an alias is the same model")
    for alias in BUNDLED_ALIASES:
        r = daemon.call("embed", input="an alias is the same model", model=alias)
        assert r["ok"] and r["model"] == alias
        assert cosines(vectors(r), vectors(plain))[0] >= 0.99999


def test_aliases_share_the_one_loaded_copy(workdir: Path, own_daemon: list[Daemon]) -> None:
    d = start_daemon(
        workdir,
        '[models.default]\npath = "{bundled}"\n'
        'aliases = ["text-embedding-ada-002", "text-embedding-3-small"]\n',
    )
    own_daemon.append(d)
    for name in ("default", "text-embedding-ada-002", "text-embedding-3-small"):
        assert d.call("embed", input="one copy", model=name)["ok"]
    models = d.call("models")["models"]
    assert [m["name"] for m in models] == ["default"]
    assert models[0]["aliases"] == ["text-embedding-ada-002", "text-embedding-3-small"]
    assert d.call("stats")["models"]["default"]["loads"] == 1
