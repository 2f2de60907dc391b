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


def assert_bf16_gemm_parity(arch, checkpoint, workspace, image, visual_flags=()):
    """Compile `arch`'s visual and LLM graphs with backend.compute: bf16 and check tier A against transformers
    rounding the same layers' inputs: within the bf16 thresholds, 16 greedy tokens identical."""
    from vlmc.eval.parity import failures, run_parity

    visual = compile_artifact(f"{arch}_visual.yaml", checkpoint, workspace, *visual_flags, "--compute", "bf16")
    llm = compile_artifact(f"{arch}_llm.yaml", checkpoint, workspace, "--max-prefill", 256, "--max-context", 320,
                           "--compute", "bf16")
    report = run_parity(checkpoint, str(llm), str(visual), [str(image)], "Describe the image.", 16)
    assert report["compute"] == {"visual": "bf16", "llm": "bf16"}
    assert not failures(report), failures(report)
    assert report["greedy"]["identical_tokens"] == 16
