"""A private Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) for the PACS tests.

One server per test module, on free loopback ports, with its own storage directory; it
accepts C-FIND, C-MOVE and C-GET from us (AE ``BMETRACK``) and serves DICOMweb.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

ORTHANC = shutil.which("Orthanc")
_PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _dicomweb_plugin() -> Path | None:
    for folder in _PLUGIN_DIRS:
        hits = sorted(folder.glob("libOrthancDicomWeb.so*")) if folder.is_dir() else []
        if hits:
            return hits[0]
    return None


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A private Orthanc with the DICOMweb plugin on loopback ports, stopped at the end."""
    if ORTHANC is None:
        pytest.skip("the Orthanc binary is absent (apt-get install orthanc orthanc-dicomweb)")
    plugin = _dicomweb_plugin()
    if plugin is None:
        pytest.skip("the Orthanc DICOMweb plugin is absent (apt-get install orthanc-dicomweb)")
    import requests

    root = tmp_path_factory.mktemp("orthanc")
    http_port, dicom_port, our_port = free_port(), free_port(), free_port()
    config = {
        "Name": "bmetrack-test",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowMove": True,
        "DicomAlwaysAllowGet": True,
        "DicomModalities": {"bmetrack": ["BMETRACK", "127.0.0.1", our_port]},
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    config_path = root / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log = (root / "orthanc.log").open("w")
    process = subprocess.Popen(
        [ORTHANC, str(config_path)], stdout=log, stderr=subprocess.STDOUT, cwd=root
    )
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{base}/system", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                text = (root / "orthanc.log").read_text()[-2000:]
                pytest.fail(f"Orthanc did not start:\n{text}")
            time.sleep(0.2)
        yield {
            "base": base,
            "dicomweb": f"{base}/dicom-web",
            "dimse": f"127.0.0.1:{dicom_port}:ORTHANC",
            "our_port": our_port,
        }
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
