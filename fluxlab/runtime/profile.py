"""The hardware profile `fluxlab bench` measures: what the memory planner learns from this machine.

`activation_scale` is the measured activation memory over the planner's estimate; the planner multiplies its
estimate by it afterwards. Stored as JSON in the config directory, for the device it was measured on.
"""

from __future__ import annotations

import json


def profile_path():
    from ..spec.presets import config_dir

    return config_dir() / "hardware.json"


def device_name(device) -> str:
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu:{platform.processor() or platform.machine()}"


def load_profile(device) -> dict | None:
    """The saved hardware profile, if it was measured on this device."""
    try:
        profile = json.loads(profile_path().read_text())
    except (OSError, ValueError):
        return None
    return profile if isinstance(profile, dict) and profile.get("device") == device_name(device) else None


def write_profile(profile: dict) -> str:
    from ..files import atomic_write

    path = profile_path()
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(profile, indent=2) + "\n"))
    return str(path)
