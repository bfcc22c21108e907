"""What machine a benchmark ran on (no heavy imports: scripts that must not load JAX use it too)."""

import datetime
import importlib.metadata
import os
import platform

PACKAGES = ("jax", "jaxlib", "flax", "torch", "transformers", "vllm")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor(), else "unknown CPU"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def package_version(name: str) -> str | None:
    """The installed distribution's version, without importing it (None when it is not installed)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_machine(gpus: list[str] | None = None) -> dict:
    """{date (UTC, to the minute), cpu, cores (logical CPUs), load (1-minute load average: other jobs on a
    shared machine), gpus (names, when given), python, and the versions of `PACKAGES` installed in this
    interpreter (None: not installed)}."""
    out = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load": round(os.getloadavg()[0], 2),
        "gpus": ", ".join(gpus) if gpus else None,
        "python": platform.python_version(),
    }
    out.update({name: package_version(name) for name in PACKAGES})
    return out
