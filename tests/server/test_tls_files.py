"""Reading and re-reading the server's TLS files (server/tls.py), without a server."""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path

import pytest

from weightserve.server.tls import ReloadingCertificates, TlsFiles, read_pems
from weightserve.testing import make_ca, make_leaf, utc_now


@pytest.fixture
def files(tmp_path: Path) -> TlsFiles:
    ca = make_ca()
    cert, key = make_leaf(ca, "server").write(tmp_path, "server")
    (tmp_path / "ca.crt").write_bytes(ca.cert)
    return TlsFiles(cert, key, tmp_path / "ca.crt")


def test_good_files_make_a_configuration(files: TlsFiles) -> None:
    pems = read_pems(files)
    assert pems.cert == files.cert.read_bytes() and pems.client_ca is not None
    assert pems.configuration() is not None


@pytest.mark.fault("bad or unknown server setting")
def test_a_key_of_another_certificate_is_refused(files: TlsFiles, tmp_path: Path) -> None:
    other = make_leaf(make_ca(), "other")
    files.key.write_bytes(other.key)
    with pytest.raises(ValueError, match=r"--tls-key .* does not match the certificate in --tls-cert"):
        read_pems(files)


@pytest.mark.fault("bad or unknown server setting")
def test_an_expired_certificate_is_refused(files: TlsFiles) -> None:
    later = utc_now() + datetime.timedelta(days=8)
    with pytest.raises(ValueError, match=r"--tls-cert .* expired at"):
        read_pems(files, now=later)


@pytest.mark.fault("bad or unknown server setting")
@pytest.mark.parametrize("which", ["cert", "key", "client_ca"])
def test_files_that_are_not_pem_or_missing_are_refused_naming_the_flag(files: TlsFiles, which: str) -> None:
    path: Path = getattr(files, which)
    flag = {"cert": "--tls-cert", "key": "--tls-key", "client_ca": "--tls-client-ca"}[which]
    path.write_text("not a pem\n")
    with pytest.raises(ValueError, match=f"^{flag} {path}: not"):
        read_pems(files)
    path.unlink()
    with pytest.raises(ValueError, match=f"^{flag} {path}: cannot read"):
        read_pems(files)


def test_a_rotation_is_picked_up_once_and_a_half_written_one_keeps_the_old_pair(
    files: TlsFiles, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reloading = ReloadingCertificates(files)
    first = reloading.current
    assert reloading.fetch() is None  # nothing changed

    ca = make_ca()
    new = make_leaf(ca, "server-2")
    files.cert.write_bytes(new.cert)  # the certificate first: the key does not match it yet
    with caplog.at_level(logging.ERROR):
        assert reloading.fetch() is None
        assert reloading.fetch() is None  # logged once, not per handshake
    assert reloading.current is first and reloading.rejected == 1
    assert caplog.text.count("keeping the previous certificate") == 1

    files.key.write_bytes(new.key)
    assert reloading.fetch() is not None
    assert reloading.current.cert == new.cert and reloading.reloads == 1
    assert reloading.fetch() is None


def test_a_kubernetes_style_symlink_swap_is_seen(tmp_path: Path) -> None:
    # A mounted Secret: tls.crt -> ..data/tls.crt, ..data -> ..2026_01_01; an update
    # writes a new timestamped folder and repoints ..data in one rename.
    ca = make_ca()
    mount = tmp_path / "mount"
    mount.mkdir()
    make_leaf(ca, "v1").write(mount / "..v1", "tls")
    (mount / "..data").symlink_to("..v1")
    for name in ("tls.crt", "tls.key"):
        (mount / name).symlink_to(f"..data/{name}")
    files = TlsFiles(mount / "tls.crt", mount / "tls.key")
    reloading = ReloadingCertificates(files)

    v2 = make_leaf(ca, "v2")
    v2.write(mount / "..v2", "tls")
    (mount / "..data_tmp").symlink_to("..v2")
    os.rename(mount / "..data_tmp", mount / "..data")
    assert reloading.fetch() is not None
    assert reloading.current.cert == v2.cert


@pytest.mark.fault("bad or unknown server setting")
def test_a_rotation_to_a_certificate_not_valid_yet_keeps_the_old_pair_until_it_is(
    files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    now = [utc_now()]
    reloading = ReloadingCertificates(files, clock=lambda: now[0])
    first = reloading.current
    tomorrow = now[0] + datetime.timedelta(days=1)
    early = make_leaf(
        make_ca(), "server-tomorrow", not_before=tomorrow, not_after=tomorrow + datetime.timedelta(days=30)
    )
    tmp = files.cert.with_suffix(".new")
    for data, path in ((early.key, files.key), (early.cert, files.cert)):  # whole files, renamed in
        tmp.write_bytes(data)
        tmp.rename(path)
    with caplog.at_level(logging.ERROR):
        assert reloading.fetch() is None
        assert reloading.fetch() is None  # logged and counted once, not per handshake
    assert reloading.current is first and (reloading.rejected, reloading.reloads) == (1, 0)
    assert caplog.text.count("keeping the previous certificate") == 1 and "is not valid before" in caplog.text

    now[0] = tomorrow + datetime.timedelta(seconds=1)  # its time has come: the next handshake takes it
    assert reloading.fetch() is not None
    assert reloading.current.cert == early.cert and (reloading.rejected, reloading.reloads) == (1, 1)
    assert reloading.fetch() is None
