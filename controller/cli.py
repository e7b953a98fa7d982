"""The ``shopfloor`` command: serve the controller, make tokens and images, drive machines."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.table import Table

from agents.client import Client
from controller.errors import ShopfloorError
from controller.settings import get_settings
from controller.store.models import Role

KEEP_ALIVE_S = 75

app = typer.Typer(
    no_args_is_help=True, help="Shopfloor: machines for agent-native software factories."
)
token_app = typer.Typer(no_args_is_help=True, help="API tokens.")
image_app = typer.Typer(no_args_is_help=True, help="The runner image.")
machines_app = typer.Typer(no_args_is_help=True, help="Machines (talks to a running controller).")
snapshots_app = typer.Typer(no_args_is_help=True, help="Snapshots of machines.")
app.add_typer(token_app, name="token")
app.add_typer(image_app, name="image")
app.add_typer(machines_app, name="machines")
app.add_typer(snapshots_app, name="snapshots")

console = Console()
err_console = Console(stderr=True)

UrlOpt = Annotated[str, typer.Option(envvar="SHOPFLOOR_URL", help="Controller URL.")]
TokenOpt = Annotated[str, typer.Option(envvar="SHOPFLOOR_TOKEN", help="Bearer token.")]
DEFAULT_URL = "http://127.0.0.1:8080"


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    log_level: str = "info",
) -> None:
    """Serve the API (data dir: SHOPFLOOR_DATA_DIR)."""
    import uvicorn

    from controller.api.app import create_app

    # Agents pause between commands; keep their connections longer than uvicorn's 5 s.
    uvicorn.run(
        create_app(), host=host, port=port, log_level=log_level, timeout_keep_alive=KEEP_ALIVE_S
    )


@token_app.command("create")
def token_create(
    role: Annotated[Role, typer.Option(help="ops, agent or reviewer.")],
    name: Annotated[str, typer.Option(help="What the token is for.")] = "",
) -> None:
    """Make a token; it is printed once, as the last word of the output."""
    from controller.services import auth

    token = auth.issue_token(database_url=get_settings().sqlalchemy_url, role=role, name=name)
    print(f"created {role.value} token: {token}")  # noqa: T201 - the token is the output


@image_app.command("build")
def image_build(
    force: Annotated[bool, typer.Option(help="Rebuild even if present.")] = False,
) -> None:
    """Build the runner image (tagged by a hash of runner_image/)."""
    from controller.providers.docker import DockerProvider
    from controller.services import images

    provider = DockerProvider(get_settings().docker_host)
    with console.status("building the runner image") as status:
        tag = images.ensure_runner_image(
            provider, force=force, progress=lambda msg: status.update(msg)
        )
    console.print(f"runner image: [bold]{tag}[/bold]")


# ---------------------------------------------------------------- machines, over HTTP


def _fail(message: str) -> NoReturn:
    err_console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


def _call(url: str, token: str, method: str, path: str, **kwargs: Any) -> Any:
    """One API call through the agents' own client; its typed errors become a message."""
    try:
        with Client(url, token, timeout_s=900) as client:
            response = client.call(method, path, **kwargs)
            return response.json() if response.content else {}
    except ShopfloorError as exc:
        _fail(f"{exc.status_code}: {exc.message}")
    except httpx.HTTPError as exc:
        _fail(f"cannot reach the controller at {url}: {exc}")


def _machine_table(machines: list[dict[str, Any]]) -> Table:
    table = Table()
    table.add_column("id", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for name in ("repo", "commit", "pool", "cpus", "memory", "reason"):
        table.add_column(name, overflow="fold")
    for m in machines:
        table.add_row(
            m["id"],
            m["state"],
            m.get("repo") or "-",
            (m.get("commit") or m.get("ref") or "-")[:12],
            m.get("pool") or "-",
            str(m["cpus"]),
            f"{m['memory_mb']}M",
            (m.get("reason") or "")[:80],
        )
    return table


@machines_app.command("create")
def machines_create(
    repo: Annotated[str | None, typer.Option(help="URL or absolute local path.")] = None,
    ref: str | None = None,
    image: str | None = None,
    cpus: float = 1.0,
    memory_mb: int = 1024,
    network: str = "none",
    setup: Annotated[list[str] | None, typer.Option(help="Setup command (repeatable).")] = None,
    label: Annotated[list[str] | None, typer.Option(help="key=value (repeatable).")] = None,
    snapshot: Annotated[
        str | None, typer.Option(help="Start from this snapshot (no repo, ref, image, setup).")
    ] = None,
    wait: bool = True,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = "",
) -> None:
    """Provision a machine."""
    labels = dict(item.partition("=")[::2] for item in (label or []))
    body = {
        "repo": repo,
        "ref": ref,
        "image": image,
        "cpus": cpus,
        "memory_mb": memory_mb,
        "network": network,
        "setup": setup or [],
        "labels": labels,
        "snapshot": snapshot,
    }
    with console.status("provisioning (clone and setup run inside the machine)"):
        machine = _call(url, token, "POST", f"/machines?wait={str(wait).lower()}", json=body)
    console.print(_machine_table([machine]))
    if machine["state"] == "failed":
        raise typer.Exit(1)


@machines_app.command("ls")
def machines_ls(
    state: str | None = None,
    pool: str | None = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = "",
) -> None:
    """List machines."""
    params = {k: v for k, v in {"state": state, "pool": pool}.items() if v}
    console.print(_machine_table(_call(url, token, "GET", "/machines", params=params)["data"]))


@machines_app.command("show")
def machines_show(machine_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = "") -> None:
    """Show one machine as JSON."""
    console.print_json(json.dumps(_call(url, token, "GET", f"/machines/{machine_id}")))


@machines_app.command("exec")
def machines_exec(
    machine_id: str,
    cmd: Annotated[list[str], typer.Argument(help="Command (joined with spaces, run by bash).")],
    cwd: str | None = None,
    timeout_s: float = 600,
    lease_token: Annotated[
        str | None,
        typer.Option(envvar="SHOPFLOOR_LEASE_TOKEN", help="The lease's token (its secret)."),
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = "",
) -> None:
    """Run a command; its exit code becomes ours."""
    body = {"cmd": " ".join(cmd), "cwd": cwd, "timeout_s": timeout_s}
    path = f"/machines/{machine_id}/exec"
    result = _call(url, token, "POST", path, json=body, lease_token=lease_token)
    sys.stdout.write(result["stdout"])
    sys.stderr.write(result["stderr"])
    raise typer.Exit(result["exit_code"] if result["exit_code"] is not None else 1)


def _lifecycle(action: str, method: str = "POST") -> Any:
    def command(machine_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = "") -> None:
        path = f"/machines/{machine_id}" + ("" if method == "DELETE" else f"/{action}")
        with console.status(f"{action} {machine_id}"):
            machine = _call(url, token, method, path)
        console.print(f"{machine['id']}: {machine['state']}")

    command.__doc__ = f"{action.capitalize()} a machine."
    return command


machines_app.command("stop")(_lifecycle("stop"))
machines_app.command("start")(_lifecycle("start"))
machines_app.command("reset")(_lifecycle("reset"))
machines_app.command("unquarantine")(_lifecycle("unquarantine"))
machines_app.command("rm")(_lifecycle("destroy", "DELETE"))

LeaseTokenOpt = Annotated[
    str | None,
    typer.Option(envvar="SHOPFLOOR_LEASE_TOKEN", help="The lease's token, on a leased machine."),
]


def _freeze(action: str) -> Any:
    def command(
        machine_id: str,
        lease_token: LeaseTokenOpt = None,
        url: UrlOpt = DEFAULT_URL,
        token: TokenOpt = "",
    ) -> None:
        path = f"/machines/{machine_id}/{action}"
        machine = _call(url, token, "POST", path, lease_token=lease_token)
        console.print(f"{machine['id']}: {machine['state']}")

    command.__doc__ = {
        "pause": "Freeze a machine's processes with their memory (commands answer 409).",
        "resume": "Thaw a paused machine: processes, sessions and forwards carry on.",
    }[action]
    return command


machines_app.command("pause")(_freeze("pause"))
machines_app.command("resume")(_freeze("resume"))


@machines_app.command("snapshot")
def machines_snapshot(
    machine_id: str,
    name: str = "",
    label: Annotated[list[str] | None, typer.Option(help="key=value (repeatable).")] = None,
    pinned: Annotated[bool, typer.Option(help="Kept by retention whatever its age.")] = False,
    lease_token: LeaseTokenOpt = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = "",
) -> None:
    """Save a machine's disk state (filesystem and workspace)."""
    labels = dict(item.partition("=")[::2] for item in (label or []))
    body = {"name": name, "labels": labels, "pinned": pinned}
    path = f"/machines/{machine_id}/snapshots"
    with console.status(f"snapshot of {machine_id}"):
        snap = _call(url, token, "POST", path, json=body, lease_token=lease_token)
    console.print(_snapshot_table([snap]))


@machines_app.command("fork")
def machines_fork(
    machine_id: str,
    count: Annotated[int, typer.Option(help="How many copies.")] = 1,
    label: Annotated[list[str] | None, typer.Option(help="key=value (repeatable).")] = None,
    lease_token: LeaseTokenOpt = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = "",
) -> None:
    """Start COUNT copies of a machine as it is now (a snapshot, then machines from it)."""
    labels = dict(item.partition("=")[::2] for item in (label or []))
    path = f"/machines/{machine_id}/fork"
    body = {"count": count, "labels": labels}
    with console.status(f"fork of {machine_id}"):
        done = _call(url, token, "POST", path, json=body, lease_token=lease_token)
    console.print(f"snapshot {done['snapshot']['id']}")
    console.print(_machine_table(done["machines"]))


def _snapshot_table(found: list[dict[str, Any]]) -> Table:
    table = Table()
    for name in ("id", "name", "state", "machine", "commit", "size", "memory", "pinned", "used by"):
        table.add_column(name, overflow="fold")
    for s in found:
        table.add_row(
            s["id"],
            s["name"] or "-",
            s["state"],
            s["machine_id"],
            (s.get("commit") or "-")[:12],
            f"{s['size_bytes'] / 1024**2:.1f}M",
            "yes" if s["has_memory"] else "no",
            "yes" if s["pinned"] else "no",
            ", ".join(s.get("used_by") or []) or "-",
        )
    return table


@snapshots_app.command("ls")
def snapshots_ls(url: UrlOpt = DEFAULT_URL, token: TokenOpt = "") -> None:
    """List snapshots."""
    console.print(_snapshot_table(_call(url, token, "GET", "/snapshots")["data"]))


@snapshots_app.command("show")
def snapshots_show(snapshot_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = "") -> None:
    """Show one snapshot as JSON."""
    console.print_json(json.dumps(_call(url, token, "GET", f"/snapshots/{snapshot_id}")))


@snapshots_app.command("rm")
def snapshots_rm(snapshot_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = "") -> None:
    """Delete a snapshot (refused while machines or pools use it)."""
    snap = _call(url, token, "DELETE", f"/snapshots/{snapshot_id}")
    console.print(f"{snap['id']}: deleted")


# ---------------------------------------------------------------- pools and runs, over HTTP

pools_app = typer.Typer(no_args_is_help=True, help="Warm pools (talks to a running controller).")
runs_app = typer.Typer(no_args_is_help=True, help="Runs through the pipeline.")
app.add_typer(pools_app, name="pools")
app.add_typer(runs_app, name="runs")


@pools_app.command("set")
def pools_set(
    name: str,
    repo: Annotated[str | None, typer.Option(help="URL or absolute local path.")] = None,
    ref: str | None = None,
    image: str | None = None,
    min_ready: int = 1,
    max_machines: int = 4,
    reset: Annotated[str, typer.Option(help="keep, clean or recreate.")] = "clean",
    setup: Annotated[list[str] | None, typer.Option(help="Setup command (repeatable).")] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = "",
) -> None:
    """Create or change a pool."""
    template = {"repo": repo, "ref": ref, "image": image, "setup": setup or []}
    body = {"template": template, "min_ready": min_ready, "max_machines": max_machines}
    pool = _call(url, token, "PUT", f"/pools/{name}", json={**body, "reset": reset})
    console.print(_pool_table([pool]))


def _pool_table(pools: list[dict[str, Any]]) -> Table:
    table = Table("name", "repo", "min ready", "max", "reset", "counts", "reason")
    for p in pools:
        counts = ", ".join(f"{k} {v}" for k, v in p["counts"].items() if v) or "-"
        table.add_row(
            p["name"],
            p["template"].get("repo") or "-",
            str(p["min_ready"]),
            str(p["max_machines"]),
            p["reset"],
            counts,
            (p.get("reason") or "")[:60],
        )
    return table


@pools_app.command("ls")
def pools_ls(url: UrlOpt = DEFAULT_URL, token: TokenOpt = "") -> None:
    """List pools with their machine counts by state."""
    console.print(_pool_table(_call(url, token, "GET", "/pools")["data"]))


def _parse_stage(text: str) -> dict[str, Any]:
    """``name=command`` (command agent) or ``name:agent`` or a JSON object."""
    if text.lstrip().startswith("{"):
        stage: dict[str, Any] = json.loads(text)
        return stage
    if "=" in text:
        name, _, command = text.partition("=")
        return {"name": name.strip(), "agent": "command", "with": {"cmd": command}}
    name, _, agent = text.partition(":")
    return {"name": name.strip(), "agent": agent.strip() or name.strip()}


@runs_app.command("create")
def runs_create(
    task: Annotated[str, typer.Option(help="What the change should do.")],
    repo: Annotated[str, typer.Option(help="URL or absolute local path.")],
    stage: Annotated[
        list[str],
        typer.Option(help="name=shell command, name:agent, or JSON (repeatable, in order)."),
    ],
    ref: str | None = None,
    pool: str | None = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = "",
) -> None:
    """Submit a run; prints its id."""
    try:
        stages = [_parse_stage(s) for s in stage]
    except ValueError as exc:
        _fail(f"a --stage is not valid JSON: {exc}")
    body = {"task": task, "repo": repo, "ref": ref, "pool": pool, "stages": stages}
    run = _call(url, token, "POST", "/runs", json=body)
    console.print(f"{run['id']}: {run['status']}")


def _run_table(runs: list[dict[str, Any]]) -> Table:
    table = Table("id", "status", "stages", "machine", "re-creations", "reason")
    for r in runs:
        stages = " ".join(f"{s['name']}:{s['status']}" for s in r["stages"])
        table.add_row(
            r["id"],
            r["status"],
            stages,
            r.get("machine_id") or "-",
            str(r["context_recreations"]),
            (r.get("reason") or "")[:60],
        )
    return table


@runs_app.command("ls")
def runs_ls(status: str | None = None, url: UrlOpt = DEFAULT_URL, token: TokenOpt = "") -> None:
    """List runs, newest first."""
    params = {"status": status} if status else {}
    console.print(_run_table(_call(url, token, "GET", "/runs", params=params)["data"]))


@runs_app.command("show")
def runs_show(run_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = "") -> None:
    """Show one run with its stages and events as JSON."""
    console.print_json(json.dumps(_call(url, token, "GET", f"/runs/{run_id}")))


@runs_app.command("cancel")
def runs_cancel(run_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = "") -> None:
    """Cancel a run; a running stage is stopped."""
    run = _call(url, token, "POST", f"/runs/{run_id}/cancel")
    console.print(f"{run['id']}: {run['status']} (cancel requested)")


# ---------------------------------------------------------------- hosts, over HTTP

hosts_app = typer.Typer(no_args_is_help=True, help="Hosts of the fleet (their Docker engines).")
app.add_typer(hosts_app, name="hosts")


@hosts_app.command("add")
def hosts_add(
    name: str,
    engine: Annotated[
        str,
        typer.Option("--engine", help="unix:///path, ssh://user@host or tcp://host:2376."),
    ],
    label: Annotated[list[str] | None, typer.Option(help="key=value (repeatable).")] = None,
    cpus: float | None = None,
    memory_mb: int | None = None,
    disk_gb: float | None = None,
    machines: Annotated[int | None, typer.Option(help="At most this many machines.")] = None,
    tls_ca: Annotated[str | None, typer.Option(help="tcp://: the engine's CA file.")] = None,
    tls_cert: Annotated[str | None, typer.Option(help="tcp://: our certificate file.")] = None,
    tls_key: Annotated[str | None, typer.Option(help="tcp://: our key file.")] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = "",
) -> None:
    """Add or change a host; its engine must answer."""
    capacity = {"cpus": cpus, "memory_mb": memory_mb, "disk_gb": disk_gb, "machines": machines}
    body: dict[str, Any] = {
        "url": engine,
        "labels": dict(item.partition("=")[::2] for item in (label or [])),
        "capacity": {k: v for k, v in capacity.items() if v is not None},
    }
    if tls_ca or tls_cert or tls_key:
        body["tls"] = {"ca": tls_ca or "", "cert": tls_cert or "", "key": tls_key or ""}
    console.print(_host_table([_call(url, token, "PUT", f"/hosts/{name}", json=body)]))


def _host_table(hosts: list[dict[str, Any]]) -> Table:
    table = Table("name", "state", "url", "labels", "used / capacity", "machines", "engine")
    for h in hosts:
        usage = []
        for key, unit in (("cpus", ""), ("memory_mb", "M"), ("disk_gb", "G"), ("machines", "")):
            cap = h["capacity"].get(key)
            usage.append(f"{key} {h['used'][key]:g}{unit}/{'-' if cap is None else f'{cap:g}'}")
        table.add_row(
            h["name"],
            h["state"] + (f" ({h['reason'][:40]})" if h.get("reason") else ""),
            h["url"],
            ",".join(f"{k}={v}" for k, v in h["labels"].items()) or "-",
            " ".join(usage),
            ", ".join(f"{k} {v}" for k, v in h["machines"].items() if v) or "-",
            h.get("engine_version") or "-",
        )
    return table


@hosts_app.command("ls")
def hosts_ls(url: UrlOpt = DEFAULT_URL, token: TokenOpt = "") -> None:
    """List hosts: state, capacity used, machines, engine version."""
    console.print(_host_table(_call(url, token, "GET", "/hosts")["data"]))


def _host_action(action: str) -> Any:
    def command(name: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = "") -> None:
        host = _call(url, token, "POST", f"/hosts/{name}/{action}")
        console.print(f"{host['name']}: {host['state']}")

    command.__doc__ = {
        "cordon": "No new machine goes to the host.",
        "uncordon": "The host takes new machines again.",
        "drain": "Cordon the host and move its pools' ready machines elsewhere.",
    }[action]
    return command


for _action in ("cordon", "uncordon", "drain"):
    hosts_app.command(_action)(_host_action(_action))


@hosts_app.command("rm")
def hosts_rm(name: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = "") -> None:
    """Remove a host that has no machines."""
    _call(url, token, "DELETE", f"/hosts/{name}")
    console.print(f"{name}: removed")


if os.environ.get("SHOPFLOOR_CLI_DEBUG"):
    app.pretty_exceptions_enable = True
