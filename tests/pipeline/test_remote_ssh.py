"""A new machine over a real SSH remote: push to an OpenSSH server on 127.0.0.1, clone elsewhere with an
empty cache, pull, and get back every artifact bit for bit.

The server is Debian's openssh-server (.ci/run installs it), started here on a free port with a
throwaway key and its own sshd_config in a temporary folder; DVC talks to it through dvc-ssh (the
`test` extra). Without sshd or dvc-ssh the test skips and says which one is missing.
"""

import getpass
import importlib.util
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.dvc_project import copy_built, dvc, dvc_json, files_under, lock_outputs, ran, run

SSHD = Path("/usr/sbin/sshd")  # an absolute path: sshd re-executes itself and refuses a relative one
PRIVSEP_DIR = Path("/run/sshd")  # sshd exits without it; the Debian service makes it, a bare sshd does not


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, server: subprocess.Popen, log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"sshd exited with {server.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                if conn.recv(4).startswith(b"SSH-"):  # the server's banner: it really is sshd answering
                    return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail(f"sshd did not accept connections on 127.0.0.1:{port} within {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """An OpenSSH server on 127.0.0.1:<free port> that accepts one throwaway key: (user, port, key, log)."""
    if not SSHD.exists():
        pytest.skip("sshd is not installed: apt-get install openssh-server (the CI script does this)")
    if importlib.util.find_spec("dvc_ssh") is None:
        pytest.skip("dvc-ssh is not installed: pip install -e '.[test]' (the test extra pins it)")
    tmp = tmp_path_factory.mktemp("sshd")
    key, host_key = tmp / "key", tmp / "host_key"
    for path in [key, host_key]:
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "librarian-test", "-f", str(path)], tmp)
    (tmp / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
    try:
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    except OSError as err:
        pytest.fail(f"sshd needs {PRIVSEP_DIR}, which could not be made ({err}): create it as root")
    port = free_port()
    config = tmp / "sshd_config"
    config.write_text("\n".join([
        "ListenAddress 127.0.0.1",
        f"Port {port}",
        f"HostKey {host_key}",
        f"AuthorizedKeysFile {tmp / 'authorized_keys'}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",  # the test may run as root (CI does)
        "StrictModes no",  # the key files live in a temporary folder, not a 0700 ~/.ssh
        "UsePAM no",
        f"PidFile {tmp / 'sshd.pid'}",
        "Subsystem sftp internal-sftp",  # DVC's remote is SFTP; no sftp-server binary needed
        "LogLevel VERBOSE",
        "",
    ]))
    log = tmp / "sshd.log"
    with open(log, "w") as log_file:
        server = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, server, log)
        yield getpass.getuser(), port, key, log
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def test_push_then_pull_over_ssh_into_a_fresh_clone(sshd, built_project, tmp_path, monkeypatch):
    user, port, key, log = sshd
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)  # the throwaway key only, never a developer's agent
    storage = tmp_path / "remote"  # the remote's folder, reached only through sshd

    one = tmp_path / "one"
    copy_built(built_project, one, up_to_date=True)
    dvc("remote", "add", "-d", "storage", f"ssh://{user}@127.0.0.1:{port}{storage}", cwd=one)
    dvc("remote", "modify", "--local", "storage", "keyfile", str(key), cwd=one)  # a path on this machine only
    run(["git", "add", "-A"], one)
    run(["git", "commit", "-qm", "run"], one)
    dvc("push", cwd=one)
    assert any(p.is_file() for p in (storage / "files" / "md5").rglob("*")), "the push wrote nothing to the remote"

    two = tmp_path / "two"
    run(["git", "clone", "-q", str(one), str(two)], tmp_path)
    assert not (two / ".dvc" / "cache").exists()  # its own, empty cache
    in_git = set(run(["git", "ls-files"], two).splitlines())
    for path in lock_outputs(one):  # of the outputs, only the cache: false ones (git's) are there yet
        assert set(files_under(two, path)) <= in_git, path
    assert "ssh://" in (two / ".dvc" / "config").read_text()  # the remote came with the clone
    dvc("remote", "modify", "--local", "storage", "keyfile", str(key), cwd=two)
    logins = log.read_text().count("Accepted publickey")
    dvc("pull", cwd=two)
    assert log.read_text().count("Accepted publickey") > logins, "the pull never logged in to sshd"

    assert lock_outputs(two) == lock_outputs(one)
    for path in lock_outputs(one):
        assert files_under(two, path) == files_under(one, path), path
    assert "up to date" in dvc("status", cwd=two)
    assert "are in sync" in dvc("status", "--cloud", cwd=two)  # the remote has every hash in dvc.lock
    assert dvc_json("data", "status", "--json", "--not-in-remote", cwd=two) == {}
    out = dvc("repro", cwd=two)
    assert ran(out) == [] and "Running stage" not in out, out
    assert (two / "metrics" / "metrics.json").read_bytes() == (one / "metrics" / "metrics.json").read_bytes()
