"""A throwaway S3-compatible server for tests: Debian's OpenStack Swift
(``apt-get install swift-proxy swift-account swift-container swift-object``)
with its ``s3api`` middleware, on 127.0.0.1, its files in a temp dir (like
tests/redisserver.py and tests/pgserver.py).

Reusable by any suite::

    from tests.swiftserver import SwiftServer
    server = SwiftServer.shared()        # raises SwiftServerError if it cannot
    server.blob_url("test-prefix")       # "s3://BUCKET/test-prefix?endpoint=..."

One account, one container and one object server, each a single process
(``workers = 0``) with the system python3, over rings of one replica on one
device (a directory in the temp dir, ``mount_check = false``: the object
server keeps its metadata in user xattrs, which ext4 and tmpfs give). The
proxy's pipeline authenticates S3 requests (AWS Signature Version 4)
against tempauth's user ``test:tester``; ``slo`` lets s3api take multipart
uploads. :meth:`shared` starts one per test process and stops it at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.ports import free_ports as _free_ports

START_TIMEOUT = 60.0
BUCKET = "shardmail-test"
ACCESS_KEY = "test:tester"
SECRET_KEY = "testing"
REGION = "us-east-1"
SERVERS = ("account", "container", "object")


class SwiftServerError(RuntimeError):
    pass


def find_swift() -> str:
    """The directory of the Swift daemons (``swift-proxy-server`` ...)."""
    for name in ("swift-proxy-server", "swift-account-server", "swift-object-server"):
        if shutil.which(name) is None:
            raise SwiftServerError(
                f"{name} not found (tests/run.sh installs swift-proxy, swift-account, "
                "swift-container and swift-object)"
            )
    return str(Path(shutil.which("swift-proxy-server") or "").parent)



def _system_env() -> dict[str, str]:
    """The environment for the system python3's daemons: none of the test
    venv's Python settings."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    return {k: v for k, v in os.environ.items() if k not in drop}


_SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's python3-swift is installed for it

# argv: root, then kind:port for each ring. One partition (part power 0), one
# replica, one device: d1 under root/srv.
_BUILD_RINGS = """
import sys
from swift.common.ring import RingBuilder
root = sys.argv[1]
for arg in sys.argv[2:]:
    kind, port = arg.split(":")
    builder = RingBuilder(0, 1, 0)
    builder.add_dev({"region": 1, "zone": 1, "ip": "127.0.0.1", "port": int(port),
                     "device": "d1", "weight": 1.0})
    builder.rebalance()
    builder.get_ring().save(f"{root}/{kind}.ring.gz")
"""

_SWIFT_CONF = """\
[swift-hash]
swift_hash_path_suffix = shardmail-test
swift_hash_path_prefix = shardmail-test

[storage-policy:0]
name = Policy-0
default = yes
"""

_BACKEND_CONF = """\
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = {port}
workers = 0
devices = {devices}
mount_check = false
swift_dir = {root}
log_level = INFO

[pipeline:main]
pipeline = {kind}-server

[app:{kind}-server]
use = egg:swift#{kind}
"""

_PROXY_CONF = """\
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = {port}
workers = 0
swift_dir = {root}
log_level = INFO

[pipeline:main]
pipeline = catch_errors proxy-logging cache s3api tempauth slo proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true
# Swift's defaults (0.5 s to connect to a backend, 10 s for its answer)
# answer 503 when the one-process object server waits for a core on a
# loaded 2-core CI host: the tests are about our code, not Swift's sizing.
conn_timeout = 5
node_timeout = 60

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:proxy-logging]
use = egg:swift#proxy_logging

# tempauth needs a swift.cache; no memcached answers on this port (a closed
# loopback port: refused at once), so each lookup is a miss.
[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:{memcache_port}

[filter:s3api]
use = egg:swift#s3api
location = {region}

[filter:tempauth]
use = egg:swift#tempauth
user_test_tester = {secret} .admin

[filter:slo]
use = egg:swift#slo
"""


class SwiftServer:
    """A running Swift with s3api; ``stop()`` kills it and removes its files."""

    _shared: SwiftServer | None = None

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}
        self.startup_seconds = 0.0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['proxy']}"

    def blob_url(self, prefix: str) -> str:
        """An ``s3://`` blob URL for ``prefix`` in the test bucket, with the
        endpoint, region and credentials of this server."""
        return (
            f"s3://{BUCKET}/{prefix}?endpoint={self.endpoint}&region={REGION}"
            f"&access_key_id={ACCESS_KEY}&secret_access_key={SECRET_KEY}"
        )

    @classmethod
    def shared(cls) -> SwiftServer:
        """One server per test process, stopped at exit."""
        if cls._shared is None or not cls._shared.running():
            cls._shared = cls.start()
            atexit.register(cls._shared.stop)
        return cls._shared

    @classmethod
    def start(cls) -> SwiftServer:
        bindir = find_swift()
        server = cls(Path(tempfile.mkdtemp(prefix="shardmail-swift-")))
        began = time.monotonic()
        try:
            server._configure()
            server._spawn(bindir)
            server._create_bucket()
        except BaseException:
            server.stop()  # its logs are in the error already
            raise
        server.startup_seconds = time.monotonic() - began
        return server

    def _configure(self) -> None:
        root = self.root
        devices = root / "srv"
        (devices / "d1").mkdir(parents=True)
        (root / "swift.conf").write_text(_SWIFT_CONF)
        ports = _free_ports(5)
        self.ports = dict(zip(("proxy", *SERVERS), ports[:4], strict=True))
        memcache_port = ports[4]
        for kind in SERVERS:
            conf = _BACKEND_CONF.format(
                port=self.ports[kind], devices=devices, root=root, kind=kind
            )
            (root / f"{kind}-server.conf").write_text(conf)
        # What swift-ring-builder's create, add and rebalance do, for the
        # three rings in one process (each run of it imports Swift: ~0.6 s).
        done = subprocess.run(
            [_SYSTEM_PYTHON, "-c", _BUILD_RINGS, str(root)]
            + [f"{kind}:{self.ports[kind]}" for kind in SERVERS],
            capture_output=True,
            cwd=root,
            env=_system_env(),
            check=False,
        )
        for kind in SERVERS:
            if done.returncode != 0 or not (root / f"{kind}.ring.gz").exists():
                raise SwiftServerError(
                    f"building the {kind} ring: {done.stdout.decode(errors='replace')}"
                    f"{done.stderr.decode(errors='replace')}"
                )
        (root / "proxy-server.conf").write_text(
            _PROXY_CONF.format(
                port=self.ports["proxy"],
                root=root,
                region=REGION,
                secret=SECRET_KEY,
                memcache_port=memcache_port,
            )
        )

    def _spawn(self, bindir: str) -> None:
        for kind in (*SERVERS, "proxy"):
            with open(self.root / f"{kind}.log", "ab") as log:
                # -v: log to stderr (the log file) rather than to syslog
                self.procs[kind] = subprocess.Popen(
                    [
                        os.path.join(bindir, f"swift-{kind}-server"),  # #!/usr/bin/python3
                        str(self.root / f"{kind}-server.conf"),
                        "-v",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=self.root,
                    env=_system_env(),
                    start_new_session=True,
                )
        deadline = time.monotonic() + START_TIMEOUT
        for kind, port in self.ports.items():
            while not self._answers(port):
                proc = self.procs[kind]
                if proc.poll() is not None:
                    raise SwiftServerError(f"swift-{kind}-server exited:\n{self.logs()}")
                if time.monotonic() > deadline:
                    raise SwiftServerError(f"swift-{kind}-server did not answer:\n{self.logs()}")
                time.sleep(0.05)

    @staticmethod
    def _answers(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # an HTTP answer, even 4xx: it is serving
        except OSError:
            return False

    def _create_bucket(self) -> None:
        """PUT /BUCKET through s3api, signed like any S3 client would."""
        from storage.blob.s3 import EMPTY_SHA256, sign

        url = f"{self.endpoint}/{BUCKET}"
        headers = sign("PUT", url, {}, EMPTY_SHA256, ACCESS_KEY, SECRET_KEY, REGION)
        request = urllib.request.Request(url, data=b"", method="PUT", headers=headers)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(request, timeout=10):
                    return
            except urllib.error.HTTPError as err:
                body = err.read().decode(errors="replace")
                if err.code == 409 and "BucketAlreadyOwnedByYou" in body:
                    return
                if err.code < 500 or time.monotonic() > deadline:
                    raise SwiftServerError(
                        f"creating the bucket: HTTP {err.code} {body}\n{self.logs()}"
                    ) from None
            time.sleep(0.1)  # 503 while the account and container settle

    def running(self) -> bool:
        return bool(self.procs) and all(p.poll() is None for p in self.procs.values())

    def logs(self) -> str:
        """The tail of each daemon's log, for a failure message."""
        out = []
        for kind in ("proxy", *SERVERS):
            path = self.root / f"{kind}.log"
            if path.exists():
                out.append(f"--- {kind}.log ---\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self.procs = {}
        shutil.rmtree(self.root, ignore_errors=True)
