"""Runtime configuration: one flat TOML file with a key for every ``edgestad run`` option.

Keys are the CLI option names with ``-`` written as ``_`` (``--save-ng`` -> ``save_ng``).
Precedence: built-in default < config file < command line. Relative paths in a file are relative
to that file's folder, so ``/etc/edgestad/edgestad.toml`` can say ``bundle = "bundle"``.
Unknown keys and wrong types are errors that name the key and the file: a typo in a service
config must not be silently ignored on a line-side machine.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from edgestad.runner import RUN_BACKENDS, backend_spellings

from .errors import ConfigError

SOURCE_KEYS = ("camera", "video", "folder", "url", "gstreamer")
PATH_KEYS = ("bundle", "video", "folder", "events", "save_ng", "trt_cache", "webhook_outbox", "trusted_key",
             "captures", "users")


@dataclass
class RunConfig:
    bundle: str | None = None
    # exactly one source
    camera: str | None = None  # index ("0") or device path ("/dev/video0")
    video: str | None = None
    folder: str | None = None
    url: str | None = None
    gstreamer: str | None = None
    frame_size: str | None = None  # "WxH": requested from cameras, enforced for every frame
    camera_fps: float | None = None
    # model
    backend: str = "auto"
    precision: str | None = None
    threads: int | None = None  # ONNX Runtime intra-op threads (None: its default)
    trt_cache: str | None = None  # ONNX Runtime TensorRT EP engine cache folder
    image_threshold: float | None = None  # overrides the bundle's thresholds.image
    pixel_threshold: float | None = None  # overrides the bundle's thresholds.pixel
    min_region_area: int = 1  # regions smaller than this (map pixels) are not reported
    # outputs
    display: bool = False
    http: str | None = None  # "HOST:PORT"; default host 127.0.0.1
    http_read_timeout: float = 30.0  # s a connection may stay silent (idle keep-alive, slow request) before it is closed
    http_max_clients: int = 32  # MJPEG / live-update streams at once; more get HTTP 503
    shifts: str | None = None  # shift start times "06:00,14:00,22:00" (local time) for the page's counters
    captures: str | None = None  # folder the page's "save this frame as good/defective" writes (MVTec layout)
    users: str | None = None  # users file for the page's logins [users.json beside the config file]
    opcua: str | None = None  # "HOST:PORT": OPC UA server for PLCs
    modbus: str | None = None  # "HOST:PORT": Modbus TCP server for PLCs
    trigger: str | None = None  # "opcua": inspect one frame per OPC UA Trigger() call
    stream_fps: float = 15.0  # MJPEG stream rate cap (encoding costs CPU)
    events: str | None = None  # folder for events.jsonl
    events_all: bool = False  # log OK frames too, not only NG and lifecycle events
    events_max_mb: float = 10.0
    events_backups: int = 5
    save_ng: str | None = None  # folder for NG frames, maps and overlays
    ng_max_mb: float = 1024.0
    ng_max_age_days: float = 30.0
    webhook: str | None = None
    webhook_outbox: str | None = None  # undelivered webhook events (default: <events>/webhook-outbox)
    webhook_outbox_max: int = 10000  # events kept in the outbox; beyond that the oldest is dropped
    mqtt: str | None = None  # "host:port/topic"
    mqtt_queue: int = 1000  # MQTT messages held while the broker is away; beyond that new ones are dropped
    # run control
    max_frames: int | None = None
    reconnect_initial: float = 0.5
    reconnect_max: float = 30.0
    max_reconnects: int | None = None  # consecutive failed opens; None: forever (live), 0 (files)
    trusted_key: str | None = None  # Ed25519 public key: run only bundles signed with it
    log_level: str = "INFO"

    def source(self) -> tuple[str, str]:
        chosen = [(k, getattr(self, k)) for k in SOURCE_KEYS if getattr(self, k) not in (None, "")]
        if len(chosen) != 1:
            names = ", ".join("--" + k for k in SOURCE_KEYS)
            if not chosen:
                raise ConfigError(f"no source given: use one of {names} (or set it in the config file)")
            raise ConfigError(
                f"more than one source given ({', '.join(k for k, _ in chosen)}); use exactly one of {names}"
            )
        return chosen[0][0], str(chosen[0][1])

    def frame_size_wh(self) -> tuple[int, int] | None:
        return parse_size(self.frame_size, "frame_size") if self.frame_size else None

    def http_address(self) -> tuple[str, int] | None:
        return parse_host_port(self.http, "http") if self.http else None


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def _field_kind(f: dataclasses.Field) -> type:
    text = str(f.type)
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if text.startswith(name):
            return kind
    return str


def parse_size(text: str, key: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
        if w <= 0 or h <= 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{key}: expected WIDTHxHEIGHT such as 1280x720, got {text!r}") from None
    return w, h


def parse_host_port(text: str, option: str, default_port: int | None = None, *, min_port: int = 0,
                    error: type[Exception] = ConfigError) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT``, ``PORT`` or (with a ``default_port``) ``HOST`` -> (host, port), for
    every address option (``--http``, ``--opcua``, ``--modbus``). The host defaults to 127.0.0.1
    (this machine only: give 0.0.0.0 or the line network's address to let others in). IPv6
    addresses go in brackets: ``[::1]:4840``. Anything else raises ``error`` naming the option."""
    raw = "" if text is None else str(text).strip()
    example = f"0.0.0.0:{default_port}" if default_port else "127.0.0.1:8080"
    bad = error(f"{option}: expected HOST:PORT, :PORT or PORT such as {example}, got {text!r}")
    if raw.startswith("["):  # [v6]:port or [v6]
        host, _, rest = raw[1:].partition("]")
        if rest and (not rest.startswith(":") or rest == ":"):
            raise bad
        port_text = rest[1:] if rest else ""
    elif raw.count(":") > 1:  # a bare IPv6 address cannot carry a port without brackets
        raise bad
    elif ":" in raw:
        host, _, port_text = raw.partition(":")
        if not port_text:
            raise bad  # "host:" - a port was meant but is missing
    elif raw.isdigit():
        host, port_text = "", raw
    else:
        host, port_text = raw, ""
    host = host.strip() or "127.0.0.1"
    if any(c.isspace() or c in "/?#@[]" for c in host):
        raise bad
    if port_text == "" and default_port is None:
        raise bad
    if port_text != "" and not port_text.isdigit():
        raise bad
    port = int(default_port if port_text == "" else port_text)
    if not min_port <= port <= 65535:
        raise bad
    return host, port


def _coerce(key: str, value: Any, origin: str) -> Any:
    f = FIELDS[key]
    kind = _field_kind(f)
    if key == "camera" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # camera = 0 in TOML is natural
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
        if key == "frame_size" and isinstance(value, list) and len(value) == 2:
            return f"{value[0]}x{value[1]}"
        if key == "shifts" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return ",".join(value)
    raise ConfigError(f"{origin}: key {key!r} must be {kind.__name__}, got {type(value).__name__} {value!r}")


def read_toml(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # JetPack 6 ships Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError(f"reading {path} needs Python >= 3.11 or the 'tomli' package (pip install tomli)") from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                          f"{exc.start}); save the config file as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None


def values_from_file(path: str | os.PathLike) -> dict:
    """Validated values of a config file (paths resolved against its folder)."""
    path = Path(path)
    data = read_toml(path)
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(f"{path}: section [{key}] is not supported; the config file is flat (key = value)")
        if key not in FIELDS:
            raise ConfigError(f"{path}: unknown key {key!r} (known keys: {', '.join(sorted(FIELDS))})")
        value = _coerce(key, value, str(path))
        if key in PATH_KEYS and isinstance(value, str):
            value = str((path.parent / Path(value).expanduser()))
        out[key] = value
    return out


def build_config(config_file: str | os.PathLike | None, cli_values: Mapping[str, Any]) -> RunConfig:
    """Defaults < file < CLI. ``cli_values`` holds only options given (None means not given)."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(values_from_file(config_file))
    for key, value in cli_values.items():
        if key not in FIELDS:
            raise ConfigError(f"internal: unknown option {key!r}")
        if value is not None:
            values[key] = _coerce(key, value, "command line")
    # A source on the command line replaces the file's source instead of clashing with it.
    if any(cli_values.get(k) not in (None, "") for k in SOURCE_KEYS):
        for k in SOURCE_KEYS:
            if cli_values.get(k) in (None, ""):
                values.pop(k, None)
    cfg = RunConfig(**values)
    origin = str(config_file) if config_file else "command line"
    cli_source = any(cli_values.get(k) not in (None, "") for k in SOURCE_KEYS)
    _validate(cfg, origin, source_origin="command line" if cli_source else origin)
    return cfg


def _validate(cfg: RunConfig, origin: str, source_origin: str | None = None) -> None:
    if cfg.backend not in backend_spellings(RUN_BACKENDS):
        raise ConfigError(f"{origin}: backend must be auto, onnxruntime or tensorrt, got {cfg.backend!r}")
    if cfg.precision not in (None, "fp32", "fp16", "int8"):
        raise ConfigError(f"{origin}: precision must be fp32, fp16 or int8, got {cfg.precision!r}")
    chosen = [k for k in SOURCE_KEYS if getattr(cfg, k) not in (None, "")]
    if len(chosen) > 1:
        raise ConfigError(f"{source_origin or origin}: more than one source given ({', '.join(chosen)}); use exactly one of "
                          + ", ".join(SOURCE_KEYS))
    for key in ("events_max_mb", "ng_max_mb", "ng_max_age_days", "stream_fps", "reconnect_initial", "reconnect_max",
                "http_read_timeout"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{origin}: {key} must be > 0, got {getattr(cfg, key)}")
    for key in ("max_frames", "max_reconnects", "events_backups", "threads", "min_region_area"):
        v = getattr(cfg, key)
        if v is not None and v < 0:
            raise ConfigError(f"{origin}: {key} must be >= 0, got {v}")
    for key in ("http_max_clients", "webhook_outbox_max", "mqtt_queue"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{origin}: {key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.frame_size:
        cfg.frame_size_wh()
    if cfg.http:
        cfg.http_address()
    for key, default_port in (("opcua", 4840), ("modbus", 502)):
        if getattr(cfg, key):
            parse_host_port(getattr(cfg, key), key, default_port, min_port=1)
    if cfg.shifts:
        from .station import parse_shifts
        parse_shifts(cfg.shifts)
    if cfg.trigger not in (None, "opcua"):
        raise ConfigError(f"{origin}: trigger must be opcua (or unset), got {cfg.trigger!r}")
    if cfg.trigger == "opcua" and not cfg.opcua:
        raise ConfigError(f"{origin}: trigger = opcua needs an OPC UA server (--opcua HOST:PORT)")
    if cfg.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{origin}: log_level must be DEBUG, INFO, WARNING or ERROR, got {cfg.log_level!r}")


def example_config_text() -> str:
    """The annotated example shipped as runtime/edgestad.example.toml."""
    return (Path(__file__).with_name("edgestad.example.toml")).read_text()


if __name__ == "__main__":
    # python -m edgestad.runtime.config FILE       validate a config file, print the result
    # python -m edgestad.runtime.config --example  print the annotated example config
    if len(sys.argv) != 2:
        sys.exit("usage: python -m edgestad.runtime.config FILE | --example")
    if sys.argv[1] == "--example":
        print(example_config_text(), end="")
        sys.exit(0)
    # The same checks as `edgestad run --config FILE` (a service config must name its one source).
    try:
        checked = build_config(sys.argv[1], {})
        checked.source()
    except ConfigError as exc:
        print("error: " + "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()),
              file=sys.stderr)
        sys.exit(exc.exit_code)
    print(checked)
