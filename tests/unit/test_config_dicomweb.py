"""[[destinations]] kind = "dicomweb": validation, and what `dicomai check-config` reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomai.ops import cli
from dicomai.config import load_settings
from dicomai.errors import ConfigError

BASE = """
[general]
data_dir = "data"

[[routes]]
name = "chest-xray"
modality = ["DX"]
model = "chest-xray"

[models.chest-xray]
path = "models/chest.pt"
version = "1"
task = "chest_xray"
"""


def _load(tmp_path: Path, destination: str):
    path = tmp_path / "dicomai.toml"
    path.write_text(BASE + "\n[[destinations]]\nname = \"pacs\"\n" + destination)
    return load_settings(path, environ={})


def _error(tmp_path: Path, destination: str) -> str:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, destination)
    return str(info.value)


def test_dimse_is_the_default_kind_and_needs_its_address(tmp_path):
    dest = _load(tmp_path, 'ae_title = "PACS"\nhost = "10.0.0.5"\nport = 104\n').destinations[0]
    assert dest.kind == "dimse" and dest.address == "PACS@10.0.0.5:104"
    assert "needs ae_title, port" in _error(tmp_path, 'host = "10.0.0.5"\n')
    assert "url only apply" in _error(
        tmp_path, 'ae_title = "PACS"\nhost = "h"\nport = 104\nurl = "http://h/dicom-web"\n')


def test_dicomweb_destination(tmp_path):
    dest = _load(tmp_path, 'kind = "dicomweb"\nurl = "https://pacs.example.org/dicom-web/"\n'
                           'ca_file = "ca.pem"\ntimeout_seconds = 12\nemit_seg = false\n'
                 ).destinations[0]
    assert dest.url == "https://pacs.example.org/dicom-web"  # trailing slash dropped
    assert dest.auth == "none" and dest.verify and dest.timeout_seconds == 12
    assert dest.address == "https://pacs.example.org/dicom-web" and not dest.emit_seg
    assert dest.files() == [("ca_file", Path("ca.pem"), False)]


@pytest.mark.parametrize(("destination", "message"), [
    ('kind = "dicomweb"\n', "needs url"),
    ('kind = "dicomweb"\nurl = "ftp://h/x"\n', "http:// or https://"),
    ('kind = "dicomweb"\nurl = "http:///dicom-web"\n', "with a host"),
    ('kind = "dicomweb"\nurl = "https://u:pw@h/dicom-web"\n', "must not hold credentials"),
    ('kind = "dicomweb"\nurl = "http://h/dicom-web?x=1"\n', "without ?query"),
    ('kind = "dicomweb"\nurl = "http://h:99999/dicom-web"\n', "invalid port"),
    ('kind = "dicomweb"\nurl = "http://h/x"\nae_title = "PACS"\n', "ae_title only apply"),
    ('kind = "dicomweb"\nurl = "http://h/x"\nauth = "basic"\n',
     'auth = "basic" needs password_file and user'),
    ('kind = "dicomweb"\nurl = "http://h/x"\nauth = "bearer"\n', "needs token_file"),
    ('kind = "dicomweb"\nurl = "http://h/x"\ntoken_file = "t"\n', 'not used with auth = "none"'),
    ('kind = "dicomweb"\nurl = "http://h/x"\nca_file = "ca.pem"\n', "ca_file needs an https"),
    ('kind = "dicomweb"\nurl = "http://h/x"\nauth = "digest"\n', "auth"),
    ('kind = "smtp"\nurl = "http://h/x"\n', "kind"),
])
def test_dicomweb_mistakes_are_named(tmp_path, destination, message):
    assert message in _error(tmp_path, destination)


def test_check_config_reports_missing_files_and_no_secret(tmp_path, capsys):
    secrets = tmp_path / "data" / "secrets"
    secrets.mkdir(parents=True)
    (secrets / "pacs.password").write_text("hunter2-pw\n")
    cfg = tmp_path / "dicomai.toml"
    cfg.write_text(BASE + '''
[[destinations]]
name = "pacs"
kind = "dicomweb"
url = "https://pacs.example.org/dicom-web"
auth = "basic"
user = "dicomai"
password_file = "secrets/pacs.password"
ca_file = "/nonexistent/ca.pem"

[[destinations]]
name = "cloud"
kind = "dicomweb"
url = "https://dicom.example.com/v1/dicomWeb"
auth = "bearer"
token_file = "secrets/cloud.token"
verify = false
''')
    code = cli.main(["--config", str(cfg), "check-config"])
    out = capsys.readouterr()
    assert code != 0
    assert ("destination pacs: STOW-RS https://pacs.example.org/dicom-web (auth basic as "
            "dicomai, CA /nonexistent/ca.pem") in out.out
    assert "destination cloud: STOW-RS https://dicom.example.com/v1/dicomWeb (auth bearer, " \
           "TLS NOT VERIFIED" in out.out
    assert "error: destination pacs: ca_file: /nonexistent/ca.pem does not exist" in out.err
    assert f"error: destination cloud: token_file: {secrets / 'cloud.token'} does not exist" \
        in out.err
    assert "password_file" not in out.err  # that file is there (relative to data_dir)
    assert "hunter2" not in out.out + out.err
