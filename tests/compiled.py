"""Helpers to compile artifacts once per test session through the real CLI."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build_in" / "build"


def vlmc(*args, check=True, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "vlmc", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"vlmc {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def compile_artifact(config, checkpoint, workspace, *flags):
    proc = vlmc("compile", BUILD / config, "--checkpoint", checkpoint, "--workspace", workspace, *flags)
    return Path(proc.stdout.strip().splitlines()[-1])


def generate_json(*args):
    proc = vlmc("generate", *args, "--json")
    return json.loads(proc.stdout.strip().splitlines()[-1])
