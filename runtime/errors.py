"""Runtime error types and the process exit codes they map to.

The service (systemd ``Restart=on-failure``) and scripts read the exit code, so each kind of
failure that stops the runtime has its own documented code.
"""

from __future__ import annotations

EXIT_OK = 0  # normal end of a finite source, or SIGTERM/SIGINT after a clean flush
EXIT_CONFIG = 2  # bad command line or config file (click also uses 2 for usage errors)
EXIT_SOURCE = 3  # source cannot be opened / reconnect attempts exhausted
EXIT_MODEL = 4  # bundle, graph or engine unusable here; repeated inference failures
EXIT_OUTPUT = 5  # an output (HTTP port, events dir, display) cannot be set up


class RuntimeFailure(Exception):
    """Base of runtime errors; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class ConfigError(RuntimeFailure):
    """Bad configuration (file or CLI); the message names the key/option and the file."""

    exit_code = EXIT_CONFIG


class SourceError(RuntimeFailure):
    """A frame source could not be opened or read.

    ``permanent``: retrying cannot help (e.g. this OpenCV has no GStreamer), so the reconnect
    logic gives up at once instead of backing off forever.
    """

    exit_code = EXIT_SOURCE

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


class FrameError(RuntimeFailure):
    """One frame is unusable (empty, wrong size, wrong channels); counted, the run goes on."""

    exit_code = EXIT_SOURCE


class BackendError(RuntimeFailure):
    """The model cannot run here (missing file, wrong GPU/TensorRT, bad graph I/O)."""

    exit_code = EXIT_MODEL


class OutputError(RuntimeFailure):
    """An output (HTTP server, events folder, display, MQTT) cannot be set up."""

    exit_code = EXIT_OUTPUT
