"""Fixtures shared by the Python package's tests: a KMS server run by the ``ppml`` command."""

import os
import subprocess
import threading
from pathlib import Path

import pyarrow.compute as pc
import pytest

# The `ppml` command of the same build as the module (scripts/test sets PPML_BIN). Read
# once here: the tests' fixtures clear every PPML_* variable.
_REPO = Path(__file__).resolve().parents[2]
PPML_BIN = str(Path(os.environ.get("PPML_BIN") or Path(
    os.environ.get("CARGO_TARGET_DIR", _REPO / "target")) / "release" / "ppml").absolute())


def developers(table):
    """SimpleQuery's rows (name, age of the Developers aged 20 to 40), computed on plaintext
    by pyarrow."""
    mask = pc.and_(
        pc.equal(table["job"], "Developer"),
        pc.and_(pc.greater_equal(table["age"], 20), pc.less_equal(table["age"], 40)),
    )
    return table.filter(mask).select(["name", "age"])


def sorted_rows(table):
    """The rows of a pyarrow table as sorted tuples, to compare tables whatever their order."""
    return sorted(zip(*(table[name].to_pylist() for name in table.column_names)))


def ppml_command(*args, home, env=None, check=True):
    """Runs ``ppml ARGS`` with ``$PPML_HOME`` ``home``; returns the completed process."""
    assert os.path.exists(PPML_BIN), (
        f"no ppml command at {PPML_BIN}: build the workspace first "
        "(cargo build --release --workspace), or set PPML_BIN"
    )
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    full_env["PPML_HOME"] = str(home)
    full_env.update(env or {})
    done = subprocess.run(
        [PPML_BIN, *map(str, args)], env=full_env, capture_output=True, text=True, timeout=120
    )
    if check and done.returncode != 0:
        raise AssertionError(f"ppml {' '.join(map(str, args))}: {done.returncode}\n{done.stderr}")
    return done


class KmsServer:
    """A ``ppml kms serve`` process and an app enrolled on it (its owner key in ``home``)."""

    def __init__(self, root: Path, *extra):
        self.root = root
        self.process = subprocess.Popen(
            [PPML_BIN, "kms", "serve", "--listen", "127.0.0.1:0", "--data-dir", str(root / "kms"),
             *extra],
            env={**{k: v for k, v in os.environ.items() if not k.startswith("PPML_")},
                 "PPML_HOME": str(root / "server-home")},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        first = self.process.stdout.readline()
        second = self.process.stdout.readline()
        assert first.split()[-1].startswith("https://"), first
        self.url = first.split()[-1]
        self.fingerprint = second.strip().removeprefix("certificate fingerprint: ")
        # Keep draining stdout so that the server never blocks on a full pipe.
        threading.Thread(target=self.process.stdout.read, daemon=True).start()
        self.home = root / "home"
        enrolled = ppml_command(
            "kms", "enroll", "--kms-url", self.url, "--kms-fingerprint", self.fingerprint,
            home=self.home,
        ).stdout
        values = dict(
            line.split(" = ", 1) for line in enrolled.splitlines() if " = " in line
        )
        self.appid = values["appid"].strip('"')
        self.apikey = values["apikey"].strip('"')
        self.primary = ""
        self.primary = self.ppml("kms", "create-key").stdout.strip()
        assert self.primary

    def env(self):
        """The PPML_* variables of the enrolled app (its primary key included)."""
        return {
            "PPML_HOME": str(self.home),
            "PPML_KMS_URL": self.url,
            "PPML_KMS_FINGERPRINT": self.fingerprint,
            "PPML_APPID": self.appid,
            "PPML_APIKEY": self.apikey,
            **({"PPML_PRIMARY_KEY": self.primary} if self.primary else {}),
        }

    def ppml(self, *args, env=None, check=True):
        return ppml_command(*args, home=self.home, env={**self.env(), **(env or {})},
                            check=check)

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture
def clean_env(monkeypatch):
    """No PPML_* variable of the caller's."""
    for name in list(os.environ):
        if name.startswith("PPML_"):
            monkeypatch.delenv(name)


@pytest.fixture
def kms_server(tmp_path, clean_env):
    server = KmsServer(tmp_path, "--allow-simulation")
    yield server
    server.stop()
