"""Whether a configured torch device is there on this machine.

Checked before a stage loads a model or writes anything, so that a device this machine lacks is
one line naming the setting, not torch's assertion from inside `.to()` halfway through a stage.
Only for work done in this process: a Ray actor or a vLLM engine picks its device elsewhere.
"""

from __future__ import annotations

import torch

from akd_cache.errors import ConfigError


def require_device(name: str, setting: str) -> None:
    device = torch.device(name)
    if device.type == "cpu":
        return
    present = (torch.accelerator.current_accelerator()
               if torch.accelerator.is_available() else None)
    if present is None or present.type != device.type:
        found = "no accelerator" if present is None else f"a {present.type} accelerator only"
        raise ConfigError(f"{setting} {name!r}: this machine has {found}; set {setting} to a "
                          "device it has (cpu)")
    count = torch.accelerator.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"{setting} {name!r}: this machine has {count} {device.type} "
                          f"device(s), numbered from 0")
