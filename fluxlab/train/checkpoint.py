"""The exact training state: parameters, optimizer moments, EMA and generators, in one safetensors file.

Written atomically (one file replaced in one rename), so a kill at any moment leaves either the old state or the
new one, never tensors of one step with the counters of another; a resume first removes the temp files such a
kill can leave. safetensors + JSON only: nothing here is ever unpickled.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import UserError
from ..files import atomic_write, remove_stale_temps

STATE = Path("state") / "state.safetensors"


def save_state(run_dir: Path, step: int, params: dict, optimizer, ema: dict | None, gen) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    opt = optimizer.state_dict()
    scalars = {}
    for i, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.ndim > 0:
                tensors[f"opt.{i}.{k}"] = v.cpu().contiguous()
            else:
                scalars[f"{i}.{k}"] = float(v)
    if ema is not None:
        tensors.update({f"ema.{n}": v.cpu().contiguous() for n, v in ema.items()})
    tensors["rng"] = gen.get_state()
    tensors["torch_rng"] = torch.get_rng_state()
    info = {"step": step, "scalars": scalars, "param_groups": opt["param_groups"]}
    meta = {"fluxlab.state": json.dumps(info)}
    atomic_write(run_dir / STATE, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def check_state(run_dir: Path) -> None:
    """A resume's state file, checked before anything loads: present, a whole safetensors file (its header's
    tensors end where the file ends), and fluxlab's."""
    import struct

    f = run_dir / STATE
    if not f.is_file():
        raise UserError(f"{run_dir} has no saved training state to resume from ({STATE})")
    try:
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        info = json.loads(header["__metadata__"]["fluxlab.state"])
        int(info["step"])
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        reason = type(e).__name__
        raise UserError(f"{f} is damaged or belongs to another run ({reason}); it cannot be resumed") from None
    if f.stat().st_size != 8 + n + end:
        raise UserError(f"{f} is damaged or belongs to another run (truncated: {f.stat().st_size} of "
                        f"{8 + n + end} bytes); it cannot be resumed")


def load_state(run_dir: Path, params: dict, optimizer, ema: dict | None, gen) -> tuple[int, dict | None]:
    """Restore the saved state; returns (the step it was saved after, the EMA weights). A damaged or mismatched
    state file is one line naming it."""
    import torch
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    for folder in (run_dir, run_dir / "state"):
        remove_stale_temps(folder)
    f = run_dir / STATE
    if not f.is_file():
        raise UserError(f"{run_dir} has no saved training state to resume from ({STATE})")
    try:
        with safe_open(str(f), framework="pt") as st:
            info = json.loads(st.metadata()["fluxlab.state"])
        tensors = load_file(str(f))
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[f"param.{n}"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{f} is damaged or belongs to another run ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else e}); it cannot be resumed") from None
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    for key, v in info["scalars"].items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = torch.tensor(v)
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    if ema is not None:
        ema = {n: tensors[f"ema.{n}"].clone() for n in params}
    gen.set_state(tensors["rng"])
    torch.set_rng_state(tensors["torch_rng"])
    trim_loss_log(run_dir / "loss.csv", info["step"])
    return info["step"], ema


def trim_loss_log(path: Path, step: int) -> None:
    """Drop the loss rows logged after the checkpoint (they are trained again)."""
    if not path.is_file():
        path.write_text("step,loss,lr,seconds\n")
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    text = "".join(",".join(r) + "\n" for r in kept)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def rotate(run_dir: Path, name: str, keep: int) -> None:
    """Keep the newest `keep` step checkpoints NAME_000123.safetensors."""
    saves = sorted(run_dir.glob(f"{name}_[0-9][0-9][0-9][0-9][0-9][0-9].safetensors"))
    for old in saves[:-keep]:
        old.unlink()
