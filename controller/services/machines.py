"""Machine lifecycle: provision, stop, start, reset, destroy, and the reconcile loop.

Service functions take their dependencies (a database engine or tx, a provider,
settings) as keyword arguments so they run the same under HTTP, the CLI and tests.
"""

from __future__ import annotations

import json
import logging
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from controller.domain import MachineTemplate
from controller.errors import (
    Conflict,
    EngineError,
    ImageNotFound,
    InvalidInput,
    NotFound,
    ProcessesSurvive,
    ShopfloorError,
)
from controller.providers.base import Bind, ContainerSpec, Provider, ScratchMount
from controller.providers.fleet import LOCAL
from controller.services import hosts, repos
from controller.services.access import MachineAccess
from controller.services.images import RUNNER_CAPABILITIES
from controller.services.runtime import Controller
from controller.settings import Settings
from controller.store import events
from controller.store.db import unit_of_work
from controller.store.events import Change
from controller.store.models import Machine, MachineState, Snapshot, SnapshotState, utcnow
from controller.transport import exec as commands
from controller.transport.output import HeadTail

log = logging.getLogger(__name__)

LABEL_MACHINE = "shopfloor.machine"
LABEL_CONTROLLER = "shopfloor.controller"
LABEL_POOL = "shopfloor.pool"
LABEL_SNAPSHOT = "shopfloor.snapshot"
LABEL_FORKED_FROM = "shopfloor.forked-from"
SOURCE_MOUNT = "/source"

_CLONE_SCRIPT = r"""
set -euo pipefail
dest="/workspace/$SF_REPO_NAME"
git clone --quiet --no-checkout -- /source "$dest"
cd "$dest"
if [ "$SF_REF" = HEAD ]; then
  git checkout --quiet --force
elif git rev-parse --verify --quiet "refs/remotes/origin/$SF_REF^{commit}" >/dev/null; then
  git checkout --quiet -B "$SF_REF" "refs/remotes/origin/$SF_REF" --
elif sha=$(git rev-parse --verify --quiet --end-of-options "$SF_REF^{commit}"); then
  git checkout --quiet --detach "$sha" --
else
  echo "unknown ref '$SF_REF': no branch, tag or commit of that name in the repo" >&2
  exit 3
fi
git rev-parse HEAD
git symbolic-ref --short --quiet HEAD || true
"""

_RESET_SCRIPT = r"""
set -euo pipefail
find /workspace -mindepth 1 -maxdepth 1 ! -name "$SF_REPO_NAME" -exec rm -rf -- {} +
if [ -n "$SF_REPO_NAME" ] && [ -d "/workspace/$SF_REPO_NAME/.git" ]; then
  cd "/workspace/$SF_REPO_NAME"
  if [ -n "$SF_BRANCH" ]; then
    git checkout --quiet --force -B "$SF_BRANCH" "$SF_COMMIT" --
  else
    git checkout --quiet --force --detach "$SF_COMMIT" --
  fi
  git reset --quiet --hard "$SF_COMMIT"
  git clean -ffdxq
fi
"""

# The hand-over between two holders of a machine (every lease end, every policy), one
# script run as root in the machine (by its helper, see HANDOVER_SOCKET, or an engine exec). Root in a machine holds neither CAP_KILL nor CAP_FOWNER or
# DAC_OVERRIDE, so it can neither signal the user's processes nor remove the user's files
# from /tmp; the user can do both to its own, so those steps run as the user (setpriv).
# Root keeps the count: it reads /proc/<pid>/status (real, effective, saved uid) with
# builtins only, and a process of the user cannot trace or change a root process.
# `kill -KILL -1` as the user signals every process of the user, again until /proc shows
# none (zombies included), for at most SF_KILL_ROUNDS rounds; exit 17 when some survive
# (a fork bomb at the pid limit), and the machine is recreated. Then, with no process of
# the user left to interfere, the user removes everything it owns outside /workspace: the
# contents of its home (rebuilt from /etc/skel, which is what the image's
# `useradd --create-home` put there), of /tmp, /var/tmp, /run/lock, /dev/shm and
# /dev/mqueue (each its own starting point: any of them may be a mount of its own, a
# scratch disk or a tmpfs, which -xdev would not enter from /), any other file of its on
# the root filesystem (/usr is skipped: the image gives the user no directory there, and
# it holds most of the files), and its System V IPC objects. With SF_RESET the checkout is restored too (policy clean).
HANDOVER_KILL_ROUNDS = 400
SURVIVORS_EXIT = 17
_HANDOVER_WIPE = r"""
set -u
cd /
find / "$HOME" /tmp /var/tmp /run/lock /dev/shm /dev/mqueue -xdev \
  \( -path /proc -o -path /sys -o -path /usr -o -path /workspace \) -prune \
  -o -user "$UID" ! -path "$HOME" \( -type d ! -perm -u=rwx -exec chmod u+rwx {} \; -o -true \) \
  -print0 2>/dev/null | xargs -0r rm -rf --
[ "${PIPESTATUS[1]}" = 0 ] || { echo "could not remove every file of $USER" >&2; exit 3; }
ipcrm --all 2>/dev/null
chmod 0755 "$HOME" && cp -R --preserve=mode,timestamps /etc/skel/. "$HOME"/ || exit 3
if [ -n "${SF_RESET:-}" ]; then
  exec bash -c "$SF_RESET"
fi
"""
_HANDOVER_SCRIPT = r"""
uid=$(id -u "$SF_USER") || exit 3
others() {  # a process of the user? (/proc/<pid>/status: Uid real effective saved fs)
  local d line
  for d in /proc/[1-9]*; do
    while IFS= read -r line; do
      case $line in
        Uid:*) set -- $line
               [ "$2" = "$uid" ] || [ "$3" = "$uid" ] || [ "$4" = "$uid" ] && return 0
               break ;;
      esac
    done 2>/dev/null < "$d/status"
  done
  return 1
}
as_user() { setpriv --reuid="$uid" --regid="$uid" --init-groups --reset-env -- "$@"; }
n=0
while others; do
  as_user kill -KILL -1 2>/dev/null
  n=$((n + 1))
  if [ "$n" -gt "$SF_KILL_ROUNDS" ]; then
    echo "processes of $SF_USER survived $SF_KILL_ROUNDS rounds of SIGKILL" >&2
    exit 17
  fi
  [ "$n" -lt 20 ] || sleep 0.01 || true
done
as_user nice -n 10 ionice -c 2 -n 7 -t env SF_RESET="${SF_RESET:-}" SF_REPO_NAME="${SF_REPO_NAME:-}" \
  SF_COMMIT="${SF_COMMIT:-}" SF_BRANCH="${SF_BRANCH:-}" bash -c "$SF_WIPE"
status=$?
if others; then
  echo "a process of $SF_USER started during the hand-over" >&2
  exit 17
fi
exit "$status"
"""

# The hand-over's own way in: a small root process in the machine (``_HANDOVER_HELPER``,
# started once by the first hand-over that had to go through the engine) runs the
# hand-over script for each request on a Unix socket in a folder only root may enter
# (HANDOVER_SOCKET). The controller, root on the host, reaches that socket through
# /proc/<pid>/root (``Provider.connect_unix``): no engine exec (~60-90 ms of engine and
# CPU here) per lease end. The machine's user can neither reach the socket nor signal,
# trace or replace a root process. Whenever the helper cannot be reached or answer (not
# started yet, the machine restarted, killed by the memory limit, a remote engine), the
# hand-over goes through the engine exec as before, which starts the helper again.
HANDOVER_SOCKET = "/run/shopfloor/handover.sock"
HANDOVER_TIMEOUT_S = 900.0
_HANDOVER_HELPER = r"""
import fcntl, json, os, socket, subprocess
folder = os.path.dirname(PATH)
os.umask(0o077)
os.makedirs(folder, mode=0o700, exist_ok=True)
os.chmod(folder, 0o700)
lock = open(os.path.join(folder, "lock"), "w")
try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    raise SystemExit(0)  # one is running
try:
    os.unlink(PATH)
except FileNotFoundError:
    pass
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(PATH)
server.listen(4)
base = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8", "HOME": "/root"}
while True:
    conn, _ = server.accept()
    try:
        with conn, conn.makefile("rb") as reader:
            request = json.loads(reader.readline())
            env = {**base, **{str(k): str(v) for k, v in request["env"].items()}}
            try:
                done = subprocess.run(
                    ["bash", "-c", request["script"]], env=env, cwd="/",
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, close_fds=True)
                answer = {"exit": done.returncode,
                          "stderr": done.stderr[-16384:].decode("utf-8", "replace")}
            except OSError as exc:  # cannot fork (the pid limit): the caller recreates
                answer = {"exit": None, "stderr": f"the hand-over could not start: {exc}"}
            conn.sendall(json.dumps(answer).encode() + b"\n")
    except Exception:
        pass
"""
_START_HELPER = r"""
env -i PATH="$PATH" setsid -f python3 -I -S -c "PATH = '$SF_SOCKET'
$SF_HELPER" </dev/null >/dev/null 2>&1
exec bash -c "$SF_SCRIPT"
"""


@dataclass(frozen=True)
class MachineSpec:
    """A validated request for a machine (the route checks ranges; this checks meaning)."""

    image: str
    repo: repos.RepoSource | None = None
    ref: str = "HEAD"
    cpus: float = 1.0
    memory_mb: int = 1024
    network: str = "none"
    labels: dict[str, str] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    pool: str | None = None
    snapshot: Snapshot | None = None
    """Start from this snapshot (its image, workspace, repo and commit) instead of a clone."""
    forked_from: str | None = None
    host_labels: dict[str, str] = field(default_factory=dict)
    """Labels the host must carry (placement, see ``hosts.place``)."""
    reserved_for: str | None = None
    """An agent's fork: the API token alone to be granted it (``Machine.reserved_for``)."""


RUNNER_UID = 1000
SCRATCH_MOUNTS = [
    ScratchMount("/tmp"),
    ScratchMount("/var/tmp"),
    ScratchMount("/home/runner", uid=RUNNER_UID, mode=0o755),
]
"""Every folder of the runner image its user can write, apart from /workspace, /dev/shm and
/run/lock (found with ``find / -xdev -writable`` as runner): kept on the scratch disk."""


def container_name(machine_id: str) -> str:
    return f"shopfloor-{machine_id}"


def volume_name(machine_id: str) -> str:
    return f"shopfloor-ws-{machine_id}"


def ownership_labels(settings: Settings, install_id: str, machine: Machine) -> dict[str, str]:
    labels = {**settings.extra_label_map, LABEL_CONTROLLER: install_id, LABEL_MACHINE: machine.id}
    if machine.pool:
        labels[LABEL_POOL] = machine.pool
    if machine.snapshot_id:
        labels[LABEL_SNAPSHOT] = machine.snapshot_id
    if machine.forked_from:
        labels[LABEL_FORKED_FROM] = machine.forked_from
    labels.update({f"shopfloor.label.{k}": v for k, v in machine.labels.items()})
    return labels


def get_machine(tx: Session, machine_id: str) -> Machine:
    """Destroyed machines stay readable (a tombstone with their history); commands get 409."""
    machine = tx.get(Machine, machine_id)
    if machine is None:
        raise NotFound(f"no machine {machine_id}")
    return machine


def set_state(
    tx: Session, machine: Machine, state: MachineState, reason: str | None = None
) -> None:
    previous = machine.state
    machine.state = state
    machine.reason = reason
    machine.updated_at = utcnow()
    if state == MachineState.ready and machine.ready_at is None:
        machine.ready_at = machine.updated_at
    tx.add(machine)
    kind, subject, data = events.machine_state(machine.id, state, previous, reason)
    events.record(tx, kind, subject, **data)


def create_machine(*, tx: Session, spec: MachineSpec, host: str = LOCAL) -> Machine:
    """Record the intent on the host placement chose; :func:`provision` makes it real."""
    machine = Machine(
        image=spec.image,
        repo=spec.repo.value if spec.repo else None,
        repo_name=spec.repo.name if spec.repo else None,
        ref=spec.ref if spec.repo else None,
        cpus=spec.cpus,
        memory_mb=spec.memory_mb,
        network=spec.network,
        labels=spec.labels,
        setup=spec.setup,
        pool=spec.pool,
        container_name="",
        volume_name="",
        host=host,
    )
    machine.container_name = container_name(machine.id)
    machine.volume_name = volume_name(machine.id)
    snap = spec.snapshot
    if snap is not None:
        machine.repo, machine.repo_name, machine.ref = snap.repo, snap.repo_name, snap.ref
        machine.commit, machine.branch = snap.commit, snap.branch
        machine.setup, machine.snapshot_id = list(snap.setup), snap.id
    machine.forked_from, machine.reserved_for = spec.forked_from, spec.reserved_for
    tx.add(machine)
    events.record(
        tx,
        "machine.created",
        machine.id,
        repo=machine.repo,
        pool=machine.pool,
        snapshot=machine.snapshot_id,
        forked_from=machine.forked_from,
        host=host,
    )
    return machine


def provision(
    *,
    db: Engine,
    provider: Provider,
    settings: Settings,
    install_id: str,
    machine_id: str,
    reraise: bool = False,
    stopping: threading.Event | None = None,
) -> Machine:
    """Create volume and container, clone, run setup (or restore its snapshot); on any
    failure remove what was made. ``reraise``: raise the failure after recording it.
    ``stopping``: the controller's stop, which cuts a provisioning short (see below)."""
    with unit_of_work(db) as tx:
        machine = get_machine(tx, machine_id)
        snap = tx.get(Snapshot, machine.snapshot_id) if machine.snapshot_id else None
    try:
        if machine.snapshot_id and (snap is None or snap.state != SnapshotState.ready):
            raise ShopfloorError(f"the snapshot {machine.snapshot_id} is gone")
        _build(db, provider, settings, install_id, machine, snap)
    except Exception as exc:  # noqa: BLE001 - any failure must end in `failed` with its reason
        reason = exc.message if isinstance(exc, ShopfloorError) else f"{type(exc).__name__}: {exc}"
        if stopping is not None and stopping.is_set():
            # The engines close under it, so the reason would be theirs ("no engine for
            # host"): left `provisioning`, which the next start fails as interrupted
            # (reconcile.fail_interrupted) and whose leftovers it removes.
            log.info("provisioning %s left to the next start: %s", machine_id, reason)
            if reraise:
                raise
            return machine
        log.warning("provisioning %s failed: %s", machine_id, reason)
        remove_resources(provider, machine)
        with unit_of_work(db) as tx:
            current = get_machine(tx, machine_id)
            if current.state == MachineState.provisioning:
                set_state(tx, current, MachineState.failed, reason)
        if reraise:
            raise
        return current
    with unit_of_work(db) as tx:
        current = get_machine(tx, machine_id)
        if current.state != MachineState.provisioning:  # destroyed or failed meanwhile
            remove_resources(provider, machine)
            return current
        current.commit, current.branch = machine.commit, machine.branch
        set_state(tx, current, MachineState.ready)
        return current


def _build(
    db: Engine,
    provider: Provider,
    settings: Settings,
    install_id: str,
    machine: Machine,
    snap: Snapshot | None = None,
) -> None:
    """On a remote host: the image is copied there first (once), the repo's mirror is
    copied into the machine instead of bind-mounted, and there are no disk caps (the
    disks are loop devices of the controller's own host). From a snapshot: its workspace
    (copy-on-write where the disks allow) and image, no clone, no setup."""
    remote = machine.host != LOCAL
    if remote and snap is None:  # a snapshot's image is on its host already
        hosts.ensure_image(db=db, provider=provider, host=machine.host, image=machine.image)
    binds: list[Bind] = []
    source = _source_path(provider, settings, machine.repo) if machine.repo and not snap else None
    if source is not None and not remote:
        binds.append(Bind(str(source), SOURCE_MOUNT, read_only=True))
    labels = ownership_labels(settings, install_id, machine)
    sized = settings.disk_limits and not remote
    engine = provider.on_host(machine.host)
    if snap is not None:
        engine.volume_from_snapshot(
            snap.volume_snapshot, machine.volume_name, labels, helper_image=snap.image
        )
    else:
        engine.create_volume(
            machine.volume_name, labels, size_bytes=settings.workspace_disk_bytes if sized else 0
        )
    spec = ContainerSpec(
        name=machine.container_name,
        image=machine.image,
        labels=labels,
        workspace_volume=machine.volume_name,
        binds=binds,
        cpus=machine.cpus,
        memory_mb=machine.memory_mb,
        pids_limit=settings.pids_limit,
        network="egress" if machine.network == "egress" else "none",
        cap_add=RUNNER_CAPABILITIES,
        scratch_bytes=settings.scratch_disk_bytes if sized else 0,
        scratch_mounts=SCRATCH_MOUNTS,
        shm_bytes=settings.shm_bytes,
        tmpfs={"/run/lock": "size=1m,mode=1777,nosuid,nodev,noexec"},
        host=machine.host,
    )
    try:
        provider.run_container(spec)
    except ImageNotFound:
        if not remote or snap is not None:
            raise
        # The host lost the image since this process saw it there: copy it again, once.
        hosts.forget_image(machine.host, machine.image)
        hosts.ensure_image(db=db, provider=provider, host=machine.host, image=machine.image)
        provider.run_container(spec)
    if snap is not None:
        return  # checkout and setup came with the snapshot
    if source is not None and remote:
        _copy_source(provider, machine, source)
    if machine.repo:
        _clone(provider, settings, machine)
    run_setup(provider, settings, machine)


def _copy_source(provider: Provider, machine: Machine, source: Path) -> None:
    """The mirror into a machine on another host (no bind of this host's folders there):
    a tar of it unpacked at /source by the engine, owned by root, readable by the user."""
    with tempfile.TemporaryFile() as tarball:
        with tarfile.open(fileobj=tarball, mode="w") as tar:
            tar.add(str(source), arcname=SOURCE_MOUNT.strip("/"), filter=_root_owned)
        tarball.seek(0)
        provider.put_archive(machine.container_name, "/", tarball.read())


def _root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _source_path(provider: Provider, settings: Settings, repo: str) -> Path:
    """The host-side mirror of the repo, brought up to date now: local repos too, so the
    machine's user never reads the operator's folders and new commits show up. The policy
    is checked again (the settings may have changed since the template was)."""
    source = repo_source(provider=provider, settings=settings, value=repo)
    return repos.sync_mirror(settings.data_dir, source, timeout_s=settings.provision_timeout_s)


def _run_script(
    provider: Provider,
    settings: Settings,
    machine: Machine,
    script: str,
    env: dict[str, str],
    what: str,
    cwd: str = "/workspace",
) -> commands.ExecResult:
    """Run one provisioning step; a non-zero exit fails it with the output's tail."""
    result = commands.run(
        provider,
        machine.container_name,
        commands.ExecRequest(cmd=script, cwd=cwd, env=env, timeout_s=settings.provision_timeout_s),
        cap=64 * 1024,
    )
    if result.exit_code != 0:
        detail = (result.stderr or result.stdout).strip()[-2000:]
        raise ShopfloorError(f"{what} failed (exit {result.exit_code}): {detail}")
    return result


def _clone(provider: Provider, settings: Settings, machine: Machine) -> None:
    env = {"SF_REPO_NAME": machine.repo_name or "", "SF_REF": machine.ref or "HEAD"}
    result = _run_script(provider, settings, machine, _CLONE_SCRIPT, env, "clone")
    lines = result.stdout.split()
    machine.commit = lines[0] if lines else None
    machine.branch = lines[1] if len(lines) > 1 else None


def run_setup(provider: Provider, settings: Settings, machine: Machine) -> None:
    for number, cmd in enumerate(machine.setup, start=1):
        what = f"setup command {number} ({cmd!r})"
        _run_script(provider, settings, machine, cmd, {}, what, cwd=machine.workdir)


def remove_resources(provider: Provider, machine: Machine) -> None:
    for remove, name in (
        (provider.remove_container, machine.container_name),
        (provider.remove_volume, machine.volume_name),
    ):
        try:
            remove(name)
        except EngineError as exc:  # the reconcile loop retries orphans later
            log.warning("cleanup of %s failed: %s", name, exc)


def _transition(
    db: Engine, machine_id: str, allowed: tuple[MachineState, ...], action: str
) -> Machine:
    with unit_of_work(db) as tx:
        machine = get_machine(tx, machine_id)
        if machine.state not in allowed:
            raise Conflict(
                f"cannot {action} machine {machine_id} while it is {machine.state.value}",
                state=machine.state.value,
            )
        return machine


def stop_machine(
    *, db: Engine, provider: Provider, access: MachineAccess, machine_id: str
) -> Machine:
    machine = _transition(db, machine_id, (MachineState.ready, MachineState.stopped), "stop")
    provider.stop_container(machine.container_name)
    with unit_of_work(db) as tx:
        machine = get_machine(tx, machine_id)
        set_state(tx, machine, MachineState.stopped)
    access.close_machine(machine=machine, why="the machine was stopped")
    return machine


def start_machine(*, db: Engine, provider: Provider, machine_id: str) -> Machine:
    machine = _transition(db, machine_id, (MachineState.stopped, MachineState.ready), "start")
    provider.start_container(machine.container_name)
    with unit_of_work(db) as tx:
        machine = get_machine(tx, machine_id)
        set_state(tx, machine, MachineState.ready)
        return machine


def reset_machine(
    *,
    db: Engine,
    provider: Provider,
    settings: Settings,
    access: MachineAccess,
    machine_id: str,
    allowed: tuple[MachineState, ...] = (MachineState.ready,),
) -> Machine:
    """Back to a clean checkout of the machine's commit, then the setup commands again; the
    channels into it close (sessions, forwards: they knew the machine before)."""
    machine = _transition(db, machine_id, allowed, "reset")
    env = {
        "SF_REPO_NAME": machine.repo_name or "",
        "SF_COMMIT": machine.commit or "",
        "SF_BRANCH": machine.branch or "",
    }
    _run_script(provider, settings, machine, _RESET_SCRIPT, env, "reset")
    run_setup(provider, settings, machine)
    with unit_of_work(db) as tx:
        machine = get_machine(tx, machine_id)
        events.record(tx, "machine.reset", machine.id, commit=machine.commit)
    access.close_machine(machine=machine, why="the machine was reset")
    return machine


def hand_over(
    *,
    db: Engine,
    provider: Provider,
    settings: Settings,
    access: MachineAccess,
    machine_id: str,
    container: str,
    restore_checkout: bool,
) -> Change:
    """Between two holders: end every channel and every process of the machine's user and
    wipe what it owns outside /workspace (see ``_HANDOVER_SCRIPT``); with
    ``restore_checkout`` (policy ``clean``) the checkout is restored and setup runs again.
    Answers its event, for the caller to write with the machine's next state.

    Raises :class:`ProcessesSurvive` when processes could not all be ended (the caller
    recreates the machine), :class:`ShopfloorError` when the wipe or reset failed."""
    started = time.monotonic()
    access.close_container(machine_id=machine_id, container=container, why="its lease ended")
    env = {
        "SF_KILL_ROUNDS": str(HANDOVER_KILL_ROUNDS),
        "SF_USER": "runner",
        "SF_WIPE": _HANDOVER_WIPE,
    }
    machine = None
    if restore_checkout:
        with unit_of_work(db) as tx:
            machine = get_machine(tx, machine_id)
        env.update(
            SF_RESET=_RESET_SCRIPT,
            SF_REPO_NAME=machine.repo_name or "",
            SF_COMMIT=machine.commit or "",
            SF_BRANCH=machine.branch or "",
        )
    answer = _hand_over_through_helper(provider, container, env)
    if answer is None:
        answer = _hand_over_through_engine(provider, container, env)
    exit_code, detail = answer
    detail = detail.strip()[-2000:]
    if exit_code == SURVIVORS_EXIT or exit_code is None or exit_code >= 126:
        raise ProcessesSurvive(
            f"the hand-over could not end every process (exit {exit_code}): {detail}"
        )
    if exit_code != 0:
        raise ShopfloorError(f"hand-over failed (exit {exit_code}): {detail}")
    if machine is not None:
        run_setup(provider, settings, machine)
    elapsed_ms = round((time.monotonic() - started) * 1000, 1)
    return ("machine.handed_over", machine_id, {"reset": restore_checkout, "ms": elapsed_ms})


def _hand_over_through_helper(
    provider: Provider, container: str, env: dict[str, str]
) -> tuple[int | None, str] | None:
    """The hand-over script run by the machine's helper: (exit code, stderr), or None when
    the helper cannot be reached or did not answer (then the engine's exec does it)."""
    sock = provider.connect_unix(container, HANDOVER_SOCKET, timeout_s=HANDOVER_TIMEOUT_S)
    if sock is None:
        return None
    try:
        with sock, sock.makefile("rb") as reader:
            request = {"script": _HANDOVER_SCRIPT, "env": env}
            sock.sendall(json.dumps(request).encode() + b"\n")
            line = reader.readline()
        answer = json.loads(line)
        code = answer["exit"]
        if code is None or int(code) < 0:  # could not start, or killed by a signal
            return None, str(answer["stderr"]) or f"the hand-over was killed ({code})"
        return int(code), str(answer["stderr"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.info("the hand-over helper of %s did not answer: %s", container, exc)
        return None  # the whole script again, through the engine: it is idempotent


def _hand_over_through_engine(
    provider: Provider, container: str, env: dict[str, str]
) -> tuple[int | None, str]:
    """One engine exec as root: start the machine's helper, then run the hand-over."""
    try:
        handle = provider.exec(
            container,
            ["bash", "-c", _START_HELPER],
            user="root",
            workdir="/",
            env={
                **env,
                "SF_SCRIPT": _HANDOVER_SCRIPT,
                "SF_HELPER": _HANDOVER_HELPER,
                "SF_SOCKET": HANDOVER_SOCKET,
            },
        )
        errors = HeadTail(16 * 1024)
        for stream, chunk in handle:
            if stream == "stderr":
                errors.write(chunk)
        exit_code = handle.exit_code()
    except EngineError as exc:
        if provider.inspect_container(container) is None:
            raise  # the container is gone (destroyed meanwhile): nothing to recreate
        # Could not even start: at the pid limit the engine cannot add a process.
        raise ProcessesSurvive(f"the hand-over could not run: {exc.message}") from exc
    return exit_code, errors.text()


def recreate_machine(
    *,
    db: Engine,
    provider: Provider,
    settings: Settings,
    access: MachineAccess,
    install_id: str,
    machine_id: str,
    why: str,
    stopping: threading.Event | None = None,
) -> Machine:
    """Replace a machine nobody holds by a new one of the same id and template: new
    container, new volume, new checkout (a machine whose processes could not be ended).
    ``stopping``: see :func:`provision`."""
    with unit_of_work(db) as tx:
        machine = get_machine(tx, machine_id)
        if machine.state != MachineState.leased:
            raise Conflict(
                f"cannot recreate machine {machine_id} while it is {machine.state.value}",
                state=machine.state.value,
            )
        set_state(tx, machine, MachineState.provisioning, f"recreating: {why}")
    access.close_machine(machine=machine, why="the machine is recreated")
    remove_resources(provider, machine)
    return provision(
        db=db,
        provider=provider,
        settings=settings,
        install_id=install_id,
        machine_id=machine_id,
        stopping=stopping,
    )


def destroy_machine(
    *,
    db: Engine,
    provider: Provider,
    access: MachineAccess,
    machine_id: str,
    even_if_leased: bool = False,
) -> Machine:
    """``even_if_leased``: the lease layer recreating a machine whose lease just ended."""
    with unit_of_work(db) as tx:
        machine = get_machine(tx, machine_id)
        if machine.state == MachineState.destroyed:
            return machine
        if machine.state == MachineState.leased and not even_if_leased:
            raise Conflict(
                f"machine {machine_id} is leased: release the lease first", state="leased"
            )
    provider.remove_container(machine.container_name)
    provider.remove_volume(machine.volume_name)
    with unit_of_work(db) as tx:
        machine = get_machine(tx, machine_id)
        set_state(tx, machine, MachineState.destroyed)
    access.close_machine(machine=machine, why="the machine was destroyed")
    return machine


def list_machines(
    *,
    ctl: Controller,
    state: str | None = None,
    pool: str | None = None,
    label: str | None = None,
    include_destroyed: bool = False,
) -> list[Machine]:
    query = select(Machine).order_by(Machine.created_at.desc())  # type: ignore[attr-defined]
    if state:
        query = query.where(Machine.state == state)
    elif not include_destroyed:
        query = query.where(Machine.state != MachineState.destroyed)
    if pool:
        query = query.where(Machine.pool == pool)
    with unit_of_work(ctl.reader) as tx:
        machines = list(tx.exec(query))
    if label:
        key, _, value = label.partition("=")
        machines = [
            m for m in machines if key in m.labels and (not value or m.labels[key] == value)
        ]
    return machines


def show_machine(*, ctl: Controller, machine_id: str) -> Machine:
    with unit_of_work(ctl.reader) as tx:
        return get_machine(tx, machine_id)


def repo_source(*, provider: Provider, settings: Settings, value: str) -> repos.RepoSource:
    """A repo value checked against the repo policy: a local path only under
    ``SHOPFLOOR_REPO_ROOTS`` when set, and never in the engine's data root (every machine's
    workspace is there) or the controller's data dir (mirrors, keys, database), symlinks
    resolved (403). Who may name a local path at all is the caller's check (``runs``)."""
    source = repos.parse_repo(value, roots=settings.repo_root_paths)
    if source.local_path is not None:
        forbidden = [
            (Path(provider.data_root()).resolve(), "the engine's data root"),
            (settings.data_dir.resolve(), "the controller's data dir"),
        ]
        repos.check_not_within(source, forbidden)
    return source


def make_spec(
    *, ctl: Controller, template: MachineTemplate, pool: str | None = None
) -> MachineSpec:
    """Check what a template means: the repo is acceptable, the ref sane, the image there
    (or the snapshot it starts from exists, and the template does not contradict it)."""
    if template.snapshot is not None:
        return _spec_from_snapshot(ctl=ctl, template=template, pool=pool)
    repo = (
        repo_source(provider=ctl.provider, settings=ctl.settings, value=template.repo)
        if template.repo
        else None
    )
    ref = repos.check_ref(template.ref) if template.ref else "HEAD"
    image = template.image or ctl.default_image
    if not ctl.provider.image_exists(image):
        hint = " (run: shopfloor image build)" if image == ctl.default_image else ""
        raise ImageNotFound(f"unknown image {image!r}: the engine does not have it{hint}")
    return MachineSpec(
        image=image,
        repo=repo,
        ref=ref,
        cpus=template.cpus,
        memory_mb=template.memory_mb,
        network=template.network,
        labels=dict(template.labels),
        setup=list(template.setup),
        pool=pool,
        host_labels=dict(template.host_labels),
    )


def _spec_from_snapshot(
    *, ctl: Controller, template: MachineTemplate, pool: str | None
) -> MachineSpec:
    clashing = [name for name in ("repo", "ref", "image", "setup") if getattr(template, name)]
    if clashing:
        raise InvalidInput(
            f"a machine from a snapshot takes its {', '.join(clashing)} from the snapshot: "
            "leave them out of the request"
        )
    with unit_of_work(ctl.reader) as tx:
        snap = tx.get(Snapshot, template.snapshot)
    if snap is None:
        raise InvalidInput(
            f"unknown snapshot {template.snapshot!r}: GET /api/v1/snapshots lists them"
        )
    if snap.state != SnapshotState.ready:
        raise Conflict(f"snapshot {snap.id} is still being taken", state=snap.state.value)
    return MachineSpec(
        image=snap.image,
        cpus=template.cpus,
        memory_mb=template.memory_mb,
        network=template.network,
        labels=dict(template.labels),
        pool=pool,
        snapshot=snap,
    )


def request_machine(*, ctl: Controller, template: MachineTemplate, wait: bool) -> Machine:
    """A machine from a template: checked, recorded, and provisioned (see :func:`submit`)."""
    if template.prebuild:
        raise InvalidInput(
            "prebuild is for pools (PUT /pools/{name}): a single machine runs its setup"
        )
    return submit(ctl=ctl, spec=make_spec(ctl=ctl, template=template), wait=wait)


def submit(*, ctl: Controller, spec: MachineSpec, wait: bool) -> Machine:
    """Record a machine and provision it, in this thread when ``wait`` else in the background."""
    with unit_of_work(ctl.db) as tx:  # placement and record in one transaction
        host = hosts.place(
            tx,
            settings=ctl.settings,
            cpus=spec.cpus,
            memory_mb=spec.memory_mb,
            host_labels=spec.host_labels,
            pool=spec.pool,
        )
        machine = create_machine(tx=tx, spec=spec, host=host)

    def work() -> Machine:
        return provision(
            db=ctl.db,
            provider=ctl.provider,
            settings=ctl.settings,
            install_id=ctl.install_id,
            machine_id=machine.id,
            stopping=ctl.stopping,
        )

    if wait:
        return work()
    ctl.workers.submit(work)
    return machine
