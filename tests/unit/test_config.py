"""Tests of dicomai.config: the shipped file, validation, environment overrides, paths."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from dicomai.config import Settings, load_settings
from dicomai.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config" / "dicomai.toml"
NO_ENV: dict[str, str] = {}

MINIMAL = """
[general]
data_dir = "data"

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 4242

[[routes]]
name = "chest-xray"
modality = ["DX"]
body_part = ["CHEST"]
model = "chest-xray"

[models.chest-xray]
path = "models/chest.pt"
version = "1"
task = "chest_xray"
threshold = 0.5
thresholds = { pneumothorax = 0.3 }
"""


def write(tmp_path: Path, text: str, name: str = "dicomai.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, **kwargs: object) -> Settings:
    kwargs.setdefault("environ", NO_ENV)
    return load_settings(write(tmp_path, text), **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def shipped() -> Settings:
    return load_settings(SHIPPED, environ=NO_ENV)


# -- the shipped file -------------------------------------------------------------------------


def test_shipped_config_has_the_contract_sections(shipped: Settings) -> None:
    raw = tomllib.loads(SHIPPED.read_text(encoding="utf-8"))
    for key in ("ae_title", "host", "port", "allowed_calling_ae_titles"):
        assert key in raw["receiver"], key
    assert "url" in raw["database"]
    assert "path" in raw["spool"]
    assert "study_quiet_seconds" in raw["scheduler"]

    assert shipped.receiver.ae_title == "DICOMAI"
    assert shipped.receiver.port == 11112
    assert shipped.receiver.allowed_calling_ae_titles == []
    assert shipped.database.url == ""
    assert shipped.spool.path == Path("spool")
    assert shipped.scheduler.study_quiet_seconds == 30


def test_shipped_routes_all_send_to_pacs(shipped: Settings) -> None:
    assert [d.name for d in shipped.destinations] == ["pacs"]
    assert shipped.destination("pacs").ae_title == "PACS"
    assert [r.name for r in shipped.routes] == ["chest-xray", "brain-ct", "bone-xray"]
    for route in shipped.routes:
        assert route.destinations == ["pacs"], route.name
        assert route.model in shipped.models
    by_name = {r.name: r for r in shipped.routes}
    assert by_name["chest-xray"].body_part == ["CHEST"]
    assert by_name["brain-ct"].modality == ["CT"]
    assert "HEAD" in by_name["brain-ct"].body_part
    assert {"HAND", "WRIST", "KNEE"} <= set(by_name["bone-xray"].body_part)


def test_shipped_models_have_the_contract_fields(shipped: Settings) -> None:
    raw = tomllib.loads(SHIPPED.read_text(encoding="utf-8"))["models"]
    assert set(shipped.models) == {"chest-xray", "head-ct-ich", "bone-xray"}
    for name, model in shipped.models.items():
        for key in ("path", "version", "sha256", "device", "labels", "preprocessing"):
            assert key in raw[name], (name, key)
        assert model.path.suffix == ".pt"
        assert model.version
        assert model.device == "auto"
        assert model.sha256 == ""
        assert shipped.model_path(name).is_absolute()
    assert "thresholds" in raw["chest-xray"]
    assert shipped.models["head-ct-ich"].preprocessing.input_size == 256
    assert shipped.models["head-ct-ich"].preprocessing.windows == [
        (40.0, 80.0), (80.0, 200.0), (600.0, 2800.0)
    ]


def test_shipped_data_dir_is_relative_to_the_file(shipped: Settings) -> None:
    assert shipped.general.data_dir == (REPO / "var").resolve()
    assert shipped.spool_path == shipped.general.data_dir / "spool"
    assert shipped.database_url == f"sqlite:///{shipped.general.data_dir / 'dicomai.db'}"


# -- unknown keys and invalid values ----------------------------------------------------------


def test_unknown_key_names_its_path(tmp_path: Path) -> None:
    text = SHIPPED.read_text(encoding="utf-8").replace(
        'ae_title = "DICOMAI"         # our AE title', 'ae_tilte = "DICOMAI"  # typo', 1
    )
    assert "ae_tilte" in text
    with pytest.raises(ConfigError, match=r"receiver\.ae_tilte: unknown key"):
        load_text(tmp_path, text)


def test_unknown_key_in_a_model_names_its_path(tmp_path: Path) -> None:
    text = MINIMAL.replace('version = "1"', 'version = "1"\nthreshhold = 0.2')
    with pytest.raises(ConfigError, match=r"models\.chest-xray\.threshhold: unknown key"):
        load_text(tmp_path, text)


@pytest.mark.parametrize("title", ["", "   ", "A" * 17, "BAD\\AE", "TAB\tAE"])
def test_invalid_receiver_ae_title(tmp_path: Path, title: str) -> None:
    text = MINIMAL + f'\n[receiver]\nae_title = "{title.replace(chr(92), chr(92) * 2)}"\n'
    text = text.replace("\t", "\\t")
    with pytest.raises(ConfigError, match=r"receiver\.ae_title"):
        load_text(tmp_path, text)


def test_invalid_allowed_calling_ae_title(tmp_path: Path) -> None:
    text = MINIMAL + '\n[receiver]\nallowed_calling_ae_titles = ["PACS", "WAY_TOO_LONG_AE_TITLE"]\n'
    with pytest.raises(ConfigError, match=r"receiver\.allowed_calling_ae_titles"):
        load_text(tmp_path, text)


def test_ae_title_is_stripped(tmp_path: Path) -> None:
    settings = load_text(tmp_path, MINIMAL + '\n[receiver]\nae_title = "AI  "\n')
    assert settings.receiver.ae_title == "AI"


def test_route_naming_unknown_model(tmp_path: Path) -> None:
    text = MINIMAL.replace('model = "chest-xray"', 'model = "no-such-model"')
    with pytest.raises(ConfigError, match="unknown model 'no-such-model'"):
        load_text(tmp_path, text)


def test_route_naming_unknown_destination(tmp_path: Path) -> None:
    text = MINIMAL.replace('model = "chest-xray"', 'model = "chest-xray"\ndestinations = ["ris"]')
    with pytest.raises(ConfigError, match="unknown destination 'ris'"):
        load_text(tmp_path, text)


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU", "mps", "cuda:0 "])
def test_bad_device(tmp_path: Path, device: str) -> None:
    text = MINIMAL.replace('version = "1"', f'version = "1"\ndevice = "{device}"')
    with pytest.raises(ConfigError, match=r"models\.chest-xray\.device"):
        load_text(tmp_path, text)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_good_device(tmp_path: Path, device: str) -> None:
    text = MINIMAL.replace('version = "1"', f'version = "1"\ndevice = "{device}"')
    assert load_text(tmp_path, text).models["chest-xray"].device == device


@pytest.mark.parametrize(
    "sha", ["abc", "A" * 64, "g" * 64, "0" * 63, "0" * 65],
)
def test_bad_sha256(tmp_path: Path, sha: str) -> None:
    text = MINIMAL.replace('version = "1"', f'version = "1"\nsha256 = "{sha}"')
    with pytest.raises(ConfigError, match=r"models\.chest-xray\.sha256"):
        load_text(tmp_path, text)


def test_good_sha256(tmp_path: Path) -> None:
    sha = "0123456789abcdef" * 4
    text = MINIMAL.replace('version = "1"', f'version = "1"\nsha256 = "{sha}"')
    assert load_text(tmp_path, text).models["chest-xray"].sha256 == sha


def test_invalid_route_regex(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        'model = "chest-xray"', 'model = "chest-xray"\nstudy_description = ["("]'
    )
    with pytest.raises(ConfigError, match="invalid regular expression"):
        load_text(tmp_path, text)


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml", environ=NO_ENV)
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_text(tmp_path, "[receiver\nport = 1\n")


# -- environment overrides --------------------------------------------------------------------


def test_env_overrides_port_and_database_url(tmp_path: Path) -> None:
    url = "postgresql+psycopg://dicomai@db.example/dicomai"
    settings = load_settings(
        SHIPPED,
        environ={"DICOMAI_RECEIVER__PORT": "104", "DICOMAI_DATABASE__URL": url},
    )
    assert settings.receiver.port == 104
    assert isinstance(settings.receiver.port, int)
    assert settings.database.url == url
    assert settings.database_url == url
    # other keys of the same section are untouched
    assert settings.receiver.ae_title == "DICOMAI"


def test_env_ignores_other_variables_and_os_environ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DICOMAI_RECEIVER__PORT", "999")
    settings = load_settings(
        SHIPPED, environ={"OTHER__PORT": "1", "DICOMAI_RECEIVERPORT": "2", "PATH": "/bin"}
    )
    assert settings.receiver.port == 11112


def test_env_override_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"receiver\.port"):
        load_settings(SHIPPED, environ={"DICOMAI_RECEIVER__PORT": "70000"})
    with pytest.raises(ConfigError, match=r"receiver\.ae_tilte: unknown key"):
        load_settings(SHIPPED, environ={"DICOMAI_RECEIVER__AE_TILTE": "X"})


def test_env_list_value(tmp_path: Path) -> None:
    settings = load_settings(
        SHIPPED, environ={"DICOMAI_RECEIVER__ALLOWED_CALLING_AE_TITLES": '["PACS", "ORTHANC"]'}
    )
    assert settings.receiver.allowed_calling_ae_titles == ["PACS", "ORTHANC"]


def test_overrides_apply_last(tmp_path: Path) -> None:
    settings = load_settings(
        SHIPPED,
        environ={"DICOMAI_RECEIVER__PORT": "104"},
        overrides={"receiver": {"port": 2000}},
    )
    assert settings.receiver.port == 2000


# -- paths ------------------------------------------------------------------------------------


def test_relative_data_dir_resolves_against_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc" / "dicomai"
    conf_dir.mkdir(parents=True)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(conf_dir, MINIMAL.replace('data_dir = "data"', 'data_dir = "../state"'))
    settings = load_settings(path, environ=NO_ENV)
    assert settings.general.data_dir == (tmp_path / "etc" / "state").resolve()
    assert settings.spool_path == (tmp_path / "etc" / "state" / "spool").resolve()
    assert settings.model_path("chest-xray") == (
        tmp_path / "etc" / "state" / "models" / "chest.pt"
    ).resolve()


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    data = tmp_path / "abs-data"
    spool = tmp_path / "abs-spool"
    text = MINIMAL.replace('data_dir = "data"', f'data_dir = "{data.as_posix()}"')
    text += f'\n[spool]\npath = "{spool.as_posix()}"\n'
    settings = load_text(tmp_path, text)
    assert settings.general.data_dir == data
    assert settings.spool_path == spool


def test_default_data_dir_is_relative_to_the_file(tmp_path: Path) -> None:
    text = re.sub(r"\[general\]\ndata_dir = \"data\"\n", "", MINIMAL)
    assert "[general]" not in text
    sub = tmp_path / "conf"
    sub.mkdir()
    settings = load_text(sub, text)
    assert settings.general.data_dir == (tmp_path / "var").resolve()


# -- thresholds -------------------------------------------------------------------------------


def test_threshold_for_per_label_override(tmp_path: Path) -> None:
    model = load_text(tmp_path, MINIMAL).models["chest-xray"]
    assert model.threshold_for("pneumothorax") == 0.3
    assert model.threshold_for("effusion") == 0.5


def test_threshold_out_of_range(tmp_path: Path) -> None:
    text = MINIMAL.replace("threshold = 0.5", "threshold = 1.5")
    with pytest.raises(ConfigError, match=r"models\.chest-xray\.threshold"):
        load_text(tmp_path, text)


def test_env_override_of_a_string_key_with_a_numeric_value(tmp_path: Path) -> None:
    # "Any scalar key can be overridden from the environment": an all-digit AE title is valid
    # DICOM, but the TOML coercion turns it into an int that the str field then rejects.
    settings = load_settings(
        SHIPPED,
        environ={"DICOMAI_RECEIVER__AE_TITLE": "12345", "DICOMAI_GENERAL__SITE_NAME": "2024"},
    )
    assert settings.receiver.ae_title == "12345"
    assert settings.general.site_name == "2024"
