"""``edgestad run`` and ``edgestad service`` (click commands; torch-free).

Registered lazily in the top-level ``edgestad`` group; also runnable on its own as
``python -m edgestad.runtime.cli run ...`` (that is what the systemd unit and the Docker images
execute, so they never import anything but the runtime).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click

from edgestad.runner import RUN_BACKENDS, backend_spellings

from .errors import EXIT_OK, EXIT_OUTPUT, ConfigError, RuntimeFailure

log = logging.getLogger("edgestad.runtime")

def _opt(*decls: str, **kw: Any):
    kw.setdefault("default", None)
    return click.option(*decls, **kw)


@click.command("run", context_settings={"max_content_width": 110})
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@_opt("--camera", metavar="INDEX|/dev/videoN", help="Camera through V4L2 (OpenCV).")
@_opt("--video", metavar="PATH", help="Video file (ends when the file ends).")
@_opt("--folder", metavar="DIR", help="Folder of images, in name order.")
@_opt("--url", metavar="URL", help="RTSP/HTTP stream (FFmpeg); reconnects when it drops.")
@_opt("--gstreamer", metavar="PIPELINE", help="GStreamer pipeline ending in appsink (needs an OpenCV with GStreamer).")
@_opt("--frame-size", metavar="WxH", help="Request this size from the camera and reject frames of any other size.")
@_opt("--camera-fps", type=float, help="Request this frame rate from the camera.")
@_opt("--backend", type=click.Choice(backend_spellings(RUN_BACKENDS)), help="Inference backend [auto].")
@_opt("--precision", type=click.Choice(["fp32", "fp16", "int8"]), help="Graph/engine precision [fp16 on GPU, fp32 on CPU].")
@_opt("--threads", type=int, help="ONNX Runtime intra-op threads.")
@_opt("--trt-cache", metavar="DIR", help="Engine cache folder for ONNX Runtime's TensorRT EP.")
@_opt("--image-threshold", type=float, help="Override the bundle's image threshold (NG if score > it).")
@_opt("--pixel-threshold", type=float, help="Override the bundle's pixel threshold (regions).")
@_opt("--min-region-area", type=int, help="Smallest region reported, in map pixels [1].")
@_opt("--display/--no-display", help="Show the overlay in a window (needs OpenCV with GUI).")
@_opt("--http", metavar="HOST:PORT", help="Serve /, /stream.mjpg, /status, /metrics (host defaults to 127.0.0.1).")
@_opt("--http-read-timeout", type=float, metavar="S", help="Close an HTTP connection silent this long [30].")
@_opt("--http-max-clients", type=int, metavar="N", help="HTTP connections served at once; more get 503 [32].")
@_opt("--stream-fps", type=float, help="MJPEG stream rate cap [15].")
@_opt("--shifts", metavar="HH:MM,...", help="Shift start times for the page's shift counters, e.g. 06:00,14:00,22:00.")
@_opt("--captures", metavar="DIR", help="Folder the page's 'save as good/defective' writes to (MVTec layout).")
@_opt("--users", metavar="FILE", help="Users file for page logins [users.json beside --config].")
@_opt("--opcua", metavar="HOST:PORT", help="Serve decisions and counters over OPC UA (needs asyncua).")
@_opt("--modbus", metavar="HOST:PORT", help="Serve decisions and counters over Modbus TCP (needs pymodbus).")
@_opt("--trigger", type=click.Choice(["opcua"]), help="Inspect one frame per OPC UA Trigger() call.")
@_opt("--events", metavar="DIR", help="Write events.jsonl (NG and lifecycle events, fsync'd, rotated) here.")
@_opt("--events-all/--events-ng-only", help="Log OK frames too.")
@_opt("--events-max-mb", type=float, help="Rotate events.jsonl at this size [10].")
@_opt("--events-backups", type=int, help="Rotated event files kept [5].")
@_opt("--save-ng", metavar="DIR", help="Save NG frames, maps, overlays here (atomic, capped).")
@_opt("--ng-max-mb", type=float, help="Size cap of the NG folder [1024].")
@_opt("--ng-max-age-days", type=float, help="Age cap of saved NG frames [30].")
@_opt("--webhook", metavar="URL", help="POST each NG event as JSON to this URL (retried until delivered).")
@_opt("--webhook-outbox", metavar="DIR", help="Undelivered webhook events, kept across restarts [EVENTS/webhook-outbox].")
@_opt("--webhook-outbox-max", type=int, metavar="N", help="Events the webhook outbox holds; then the oldest go [10000].")
@_opt("--mqtt", metavar="HOST[:PORT]/TOPIC", help="Publish NG events over MQTT (needs paho-mqtt).")
@_opt("--mqtt-queue", type=int, metavar="N", help="MQTT messages held while the broker is away; more are dropped [1000].")
@_opt("--max-frames", type=int, help="Stop after this many frames.")
@_opt("--reconnect-initial", type=float, help="First reconnect delay in s [0.5]; doubles up to --reconnect-max.")
@_opt("--reconnect-max", type=float, help="Longest reconnect delay in s [30].")
@_opt("--max-reconnects", type=int, help="Give up after this many failed opens in a row [live: never; files: 0].")
@_opt("--trusted-key", metavar="PUB", help="Ed25519 public key (PEM): refuse bundles not signed with it (`edgestad sign`).")
@_opt("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@_opt("--config", "config_file", type=click.Path(path_type=Path), help="TOML file with any of these options (CLI wins).")
@click.pass_context
def run(ctx: click.Context, bundle: Path | None, config_file: Path | None, **options: Any) -> None:
    """Run anomaly detection on a camera, video, folder, stream or GStreamer pipeline.

    BUNDLE defaults to $EDGESTAD_BUNDLE or `bundle` in ./edgestad.toml. Exit codes: 0 done or
    stopped by SIGTERM/SIGINT, 2 bad options/config, 3 source unusable, 4 model unusable here
    (damaged bundle, graph thresholds that differ from the manifest, unsigned bundle with
    --trusted-key), 5 output unusable. Every error is one `error: ...` line on stderr.
    """
    from .config import build_config

    if bundle is not None:
        options["bundle"] = str(bundle)
    try:
        cfg = build_config(config_file, options)
    except ConfigError as exc:
        click.echo(f"error: {one_line(exc)}", err=True)
        ctx.exit(exc.exit_code)
    if cfg.users is None and config_file is not None:
        from .accounts import USERS_FILE
        beside = Path(config_file).parent / USERS_FILE   # where `edgestad users add` puts it
        cfg.users = str(beside) if beside.exists() else None
    _setup_logging(cfg.log_level)
    try:
        summary = run_with_config(cfg)
    except RuntimeFailure as exc:
        click.echo(f"error: {one_line(exc)}", err=True)
        ctx.exit(exc.exit_code)
    click.echo(json.dumps({"summary": summary}, sort_keys=True))
    ctx.exit(EXIT_OK)


def one_line(exc) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _setup_logging(level: str) -> None:
    root = logging.getLogger("edgestad")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        # journald adds its own timestamps; a terminal user still wants them, they are cheap.
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level.upper())


def run_with_config(cfg, extra_sinks=(), on_pipeline=None) -> dict:
    """Build everything from a RunConfig, run until the source ends or a signal, return the summary.

    ``on_pipeline(pipeline, http_server)`` is called before the run starts (library use).
    """
    from edgestad.bundle import BundleError, default_bundle_path, load_bundle

    from .backends import select_backend
    from .errors import BackendError
    from .http import OverlayFeed, RuntimeHttpServer
    from .notify import SystemdNotifier, WatchdogFeeder
    from .pipeline import Pipeline
    from .preprocess import InputSpec, Preprocessor
    from .results import Thresholds
    from .sinks import DisplaySink, EventLog, MqttSink, NgSaver, WebhookSink
    from .sources import Backoff, SourceSpec

    kind, target = cfg.source()
    try:
        bundle_path = Path(cfg.bundle) if cfg.bundle else default_bundle_path()
        bundle = load_bundle(bundle_path)
        check_trust(bundle, cfg.trusted_key)
    except BundleError as exc:
        raise BackendError(str(exc)) from None
    manifest_name = f"{bundle.path}/manifest.json"
    spec = InputSpec.from_manifest(bundle.manifest, manifest_name)
    thresholds = Thresholds.from_manifest(bundle.manifest, cfg.pixel_threshold, cfg.image_threshold, manifest_name)
    backend = select_backend(bundle.path, bundle.manifest, cfg.backend, cfg.precision,
                             intra_op_threads=cfg.threads, trt_cache_dir=cfg.trt_cache)
    if tuple(backend.input_shape) != (3, spec.height, spec.width):
        raise BackendError(
            f"{backend.model_file} takes input {backend.input_shape}, the manifest says 3x{spec.height}x{spec.width}"
        )
    method = bundle.manifest.get("method", "?")
    backbone = (bundle.manifest.get("backbone") or {}).get("name", "")
    log.info("model %s: %s%s (%s, %s, sha256 %s)", backend.model_file.name, method,
             f", backbone {backbone}" if backbone else "", backend.name, backend.precision,
             backend.model_sha256[:12])

    sinks: list = []
    server = None
    feed = None
    pipeline = None
    running = False
    station = None
    try:
        station = make_station(cfg, bundle, backend, thresholds, lambda: pipeline)
        if station is not None:
            sinks.append(station.sink)   # first: it stamps the counts that the events log records
        if cfg.events:
            sinks.append(EventLog(cfg.events, max_bytes=int(cfg.events_max_mb * (1 << 20)),
                                  backups=cfg.events_backups, all_frames=cfg.events_all))
        if cfg.save_ng:
            sinks.append(NgSaver(cfg.save_ng, thresholds, max_bytes=int(cfg.ng_max_mb * (1 << 20)),
                                 max_age_s=cfg.ng_max_age_days * 86400))
        if cfg.webhook:
            sinks.append(WebhookSink(cfg.webhook, outbox_dir=webhook_outbox_dir(cfg), max_outbox=cfg.webhook_outbox_max))
        if cfg.mqtt:
            sinks.append(MqttSink(cfg.mqtt, queue_size=cfg.mqtt_queue))
        if cfg.http:
            feed = OverlayFeed(thresholds, max_fps=cfg.stream_fps)
            sinks.append(feed)
        gate = plc_sinks(cfg, sinks, station, thresholds, lambda: pipeline)
        sinks.extend(extra_sinks)
        notifier = SystemdNotifier()
        source_spec = SourceSpec(kind, target, frame_size=cfg.frame_size_wh(), fps=cfg.camera_fps)
        pipeline = Pipeline(
            source_spec, backend, Preprocessor(spec, cfg.frame_size_wh()), thresholds, sinks,
            max_frames=cfg.max_frames,
            backoff=Backoff(initial=cfg.reconnect_initial, maximum=cfg.reconnect_max),
            max_reconnects=cfg.max_reconnects, min_region_area=cfg.min_region_area, trigger=gate,
            notifier=notifier, watchdog=WatchdogFeeder.from_environment(notifier),
            model_info={"bundle": str(bundle.source), "model_file": backend.model_file.name,
                        "method": method, "backbone": backbone},
        )
        if cfg.display:
            sinks.append(DisplaySink(thresholds, on_quit=pipeline.stop))
            pipeline.sinks = list(sinks)
        if cfg.http:
            host, port = cfg.http_address()
            server = RuntimeHttpServer(host, port, pipeline.snapshot, feed, station=station,
                                       read_timeout_s=cfg.http_read_timeout,
                                       max_clients=cfg.http_max_clients).start()
            log.info("operator page on %s (/, /stream.mjpg, /status, /metrics)%s", server.url,
                     "; viewing needs a login (not loopback)" if server.view_requires_login else "")
        if on_pipeline is not None:
            on_pipeline(pipeline, server)
        with _signals_stop(pipeline):
            running = True
            summary = pipeline.run()
    except BaseException:
        if not running:  # the pipeline never ran, so it did not close the sinks: do it here
            for s in sinks:
                try:
                    s.close()
                except Exception:  # noqa: BLE001
                    pass
        raise
    finally:
        if server is not None:
            server.close()
        backend.close()
    log.info("done: %s", pipeline.status_line())
    return summary.to_dict()


def make_station(cfg, bundle, backend, thresholds, pipeline_of):
    """The operator station (counters, recent scores, gallery, accounts, lead actions) when the
    page or a PLC adapter shows it; None otherwise. ``pipeline_of()`` is the running pipeline."""
    if not (cfg.http or cfg.opcua or cfg.modbus):
        return None
    from .accounts import Users
    from .station import Station, model_identity, parse_shifts

    users = Users.load(cfg.users) if cfg.users else None
    state = {"thresholds": thresholds}

    def apply(new):
        state["thresholds"] = new
        pipeline = pipeline_of()
        if pipeline is not None:
            pipeline.set_thresholds(new)

    def current():
        pipeline = pipeline_of()
        return pipeline.thresholds if pipeline is not None else state["thresholds"]

    station = Station(model=model_identity(bundle, backend, cfg.trusted_key), get_thresholds=current,
                      apply_thresholds=apply, bundle_path=bundle.path if bundle.source.is_dir() else None,
                      shifts=parse_shifts(cfg.shifts), save_ng=cfg.save_ng, captures=cfg.captures,
                      users=users, overridden=cfg.image_threshold is not None or cfg.pixel_threshold is not None)
    station.frames.size = 8 if cfg.captures else 0   # frames held for "save this frame"
    if cfg.events and station.counts.restore_from_events(cfg.events):
        log.info("counters continue from %s: %s", station.counts.restored_from, station.counts.state()["all"])
    return station


def plc_sinks(cfg, sinks: list, station, thresholds, pipeline_of):
    """Start the OPC UA / Modbus servers (appended to ``sinks``); their counters continue from the
    station's. Returns the trigger gate for ``--trigger opcua`` (None otherwise)."""
    if not (cfg.opcua or cfg.modbus):
        return None
    from .plc import ModbusSink, OpcUaSink, TriggerGate

    def status() -> dict:
        pipeline = pipeline_of()
        return pipeline.snapshot() if pipeline is not None else {"running": True, "source_connected": False}

    counts = {k: v for k, v in station.counts.state()["all"].items()}
    gate = TriggerGate() if cfg.trigger == "opcua" else None
    if cfg.opcua:
        sink = OpcUaSink(cfg.opcua, status=status, thresholds=thresholds,
                         on_trigger=gate.fire if gate is not None else None, initial_counts=counts)
        sinks.append(sink.start())
        log.info("OPC UA server on %s%s", sink.url, " (Trigger() takes one frame)" if gate else "")
    if cfg.modbus:
        sink = ModbusSink(cfg.modbus, status=status, thresholds=thresholds, initial_counts=counts)
        sinks.append(sink.start())
        log.info("Modbus TCP server on %s (unit id 1)", cfg.modbus)
    return gate


def check_trust(bundle, trusted_key: str | None) -> None:
    """The graphs' baked thresholds must equal the manifest's; with a trusted key, the bundle must
    be signed with it over exactly these files and decisions. BundleError otherwise."""
    from edgestad.bundle_thresholds import check_graph_thresholds
    from edgestad.signing import verify_signature

    check_graph_thresholds(bundle)
    if trusted_key:
        key = verify_signature(bundle, trusted_key)
        log.info("bundle signed with the trusted key %s", key)


def webhook_outbox_dir(cfg) -> str | None:
    """The webhook outbox folder: ``webhook_outbox``, else ``<events>/webhook-outbox``, else none (memory)."""
    if cfg.webhook_outbox:
        return cfg.webhook_outbox
    if cfg.events:
        return str(Path(cfg.events) / "webhook-outbox")
    return None


class _signals_stop:
    """SIGTERM/SIGINT -> pipeline.stop(): finish in-flight frames, flush, exit 0."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.previous = {}

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.pipeline.stop_event.is_set():
            log.warning("%s again: already stopping", name)
            return
        log.info("%s: stopping capture, finishing in-flight frames, flushing outputs", name)
        self.pipeline.stop(by_signal=True)

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


# --------------------------------------------------------------------------- service


@click.group("service")
def service() -> None:
    """Install or print the systemd unit that runs `edgestad run` as a service."""


def _unit_options(config: Path, user: str, watchdog: int, write_path: tuple[str, ...], csi: bool, python: str | None):
    from .service import UnitOptions

    opts = UnitOptions(config=Path(config).absolute(), user=user, group=user, watchdog_s=watchdog,
                       write_paths=tuple(str(Path(p).absolute()) for p in write_path), csi_camera=csi)
    if python:
        opts.python = python
    return opts


def _service_options(f):
    from .service import DEFAULT_CONFIG_PATH

    f = click.option("--python", default=None, help="Interpreter for ExecStart [this one].")(f)
    f = click.option("--csi", is_flag=True, help="Allow the Jetson CSI camera (nvargus-daemon socket).")(f)
    f = click.option("--write-path", multiple=True, help="Extra writable folder (events / NG dirs outside /var/lib/edgestad).")(f)
    f = click.option("--watchdog", default=30, show_default=True, help="WatchdogSec.")(f)
    f = click.option("--user", default="edgestad", show_default=True, help="Service user (and group).")(f)
    f = click.option("--config", "config", default=str(DEFAULT_CONFIG_PATH), show_default=True,
                     type=click.Path(path_type=Path), help="Config file the service runs with.")(f)
    return f


def _config_write_paths(ctx: click.Context, config: Path) -> list[str]:
    """Output folders named in the config, which must be writable under ProtectSystem=strict."""
    from .config import values_from_file

    if not Path(config).is_file():
        click.echo(f"note: {config} does not exist yet; the service needs it before it starts", err=True)
        return []
    try:
        values = values_from_file(config)
    except ConfigError as exc:
        click.echo(f"error: {one_line(exc)}", err=True)
        ctx.exit(exc.exit_code)
    paths = [values[k] for k in ("events", "save_ng", "trt_cache", "webhook_outbox", "captures") if values.get(k)]
    return paths


@service.command("print-unit")
@_service_options
@click.pass_context
def print_unit(ctx, config, user, watchdog, write_path, csi, python) -> None:
    """Print the unit to stdout (the same text `install` writes for the same options)."""
    from .service import discover_devices, unit_text

    write_paths = list(write_path) + _config_write_paths(ctx, config)
    opts = _unit_options(config, user, watchdog, tuple(write_paths), csi, python)
    click.echo(unit_text(opts, discover_devices()), nl=False)


@service.command("install")
@_service_options
@click.option("--unit-path", default=None, type=click.Path(path_type=Path),
              help="Where to write the unit [/etc/systemd/system/edgestad.service].")
@click.pass_context
def install(ctx, config, user, watchdog, write_path, csi, python, unit_path) -> None:
    """Write the unit file (then: systemctl daemon-reload && systemctl enable --now edgestad)."""
    from .service import DEFAULT_UNIT_PATH, discover_devices, install_unit, next_steps, unit_text

    write_paths = list(write_path) + _config_write_paths(ctx, config)
    opts = _unit_options(config, user, watchdog, tuple(write_paths), csi, python)
    target = Path(unit_path) if unit_path else DEFAULT_UNIT_PATH
    try:
        path = install_unit(unit_text(opts, discover_devices()), target)
    except OSError as exc:
        click.echo(f"error: cannot write {target}: {exc} (run as root, or pass --unit-path)", err=True)
        ctx.exit(EXIT_OUTPUT)
    click.echo(next_steps(path, opts, config_exists=Path(config).is_file()))


# --------------------------------------------------------------------------- users


@click.group("users")
def users() -> None:
    """Accounts for the operator page (viewer: sees it; lead: may change thresholds, capture)."""


def _users_file_option(f):
    return click.option("--file", "users_file", type=click.Path(path_type=Path), default=None,
                        help="Users file [users.json beside the service config: /etc/edgestad/users.json].")(f)


def _users_at(ctx, users_file, missing_ok):
    from .accounts import Users, default_users_path

    path = Path(users_file) if users_file else default_users_path(None)
    try:
        return Users.load(path, missing_ok=missing_ok)
    except ConfigError as exc:
        click.echo(f"error: {one_line(exc)}", err=True)
        ctx.exit(exc.exit_code)


@users.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(["viewer", "lead"]), required=True)
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin (one line) instead of a prompt.")
@click.option("--replace", is_flag=True, help="Replace an existing user's password and role.")
@_users_file_option
@click.pass_context
def users_add(ctx, name, role, password_stdin, replace, users_file) -> None:
    """Add user NAME (password hashed with scrypt; the file is written with mode 0600)."""
    accounts = _users_at(ctx, users_file, missing_ok=True)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("password", hide_input=True, confirmation_prompt=True)
    try:
        accounts.add(name, role, password, replace=replace)
        accounts.save()
    except ConfigError as exc:
        click.echo(f"error: {one_line(exc)}", err=True)
        ctx.exit(exc.exit_code)
    except OSError as exc:
        click.echo(f"error: cannot write {accounts.path}: {exc.strerror or exc}", err=True)
        ctx.exit(EXIT_OUTPUT)
    click.echo(f"{name} ({role}) written to {accounts.path}; a running `edgestad run` reads it at start")


@users.command("remove")
@click.argument("name")
@_users_file_option
@click.pass_context
def users_remove(ctx, name, users_file) -> None:
    """Remove user NAME."""
    accounts = _users_at(ctx, users_file, missing_ok=False)
    try:
        accounts.remove(name)
        accounts.save()
    except ConfigError as exc:
        click.echo(f"error: {one_line(exc)}", err=True)
        ctx.exit(exc.exit_code)
    click.echo(f"{name} removed from {accounts.path}")


@users.command("list")
@_users_file_option
@click.pass_context
def users_list(ctx, users_file) -> None:
    """List the users and their roles."""
    accounts = _users_at(ctx, users_file, missing_ok=False)
    for name, user in sorted(accounts.users.items()):
        click.echo(f"{name}\t{user['role']}\t{user.get('created', '')}")


def _one_line_group():
    from edgestad.cli import OneLineErrors
    return OneLineErrors


@click.group(cls=_one_line_group())
def main() -> None:
    """edgestad runtime (torch-free entry point)."""


main.add_command(run)
main.add_command(service)
main.add_command(users)

if __name__ == "__main__":
    main()
