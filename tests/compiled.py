"""Helpers to compile artifacts once per test session through the real CLI."""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build_in" / "build"


# Tests compile one prompt length (and one patch budget), not the default ladder of buckets: each bucket is a
# graph to export, build and link, and short prompts padded to P exercise the padding paths all the same.
def llm_shape(prefill=256, context=320):
    return ("--max-prefill", prefill, "--max-context", context, "--prefill-buckets", prefill)


def visual_budget(patches=512):
    return ("--max-patches", patches, "--patch-buckets", patches)


def vlmc(*args, check=True, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "vlmc", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"vlmc {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def compile_artifact(config, checkpoint, workspace, *flags):
    """`vlmc compile` through the CLI's own entry point in this process: each artifact saves a start-up (torch,
    TVM and transformers imports, about 5 s). Tests of the command itself run it as a subprocess."""
    from vlmc.cli import main

    args = ["compile", str(BUILD / config), "--checkpoint", str(checkpoint), "--workspace", str(workspace),
            *map(str, flags)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(args)
    assert code == 0, f"vlmc {' '.join(args)} failed ({code}); its error is in the captured stderr"
    return Path(out.getvalue().strip().splitlines()[-1])


def generate_json(*args):
    proc = vlmc("generate", *args, "--json")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_gemm_input_parity(arch, checkpoint, workspace, image, compute, visual_flags=()):
    """Compile `arch`'s visual and LLM graphs with backend.compute `compute` (bf16; or int8, with int8 weights) and
    check tier A against transformers computing the same layers' inputs the same way: within the mode's thresholds,
    16 greedy tokens identical."""
    from vlmc.eval.parity import failures, run_parity

    flags = ("--compute", compute, *(("--weights", "int8") if compute == "int8" else ()))
    visual = compile_artifact(f"{arch}_visual.yaml", checkpoint, workspace, *visual_flags, *flags)
    llm = compile_artifact(f"{arch}_llm.yaml", checkpoint, workspace, *llm_shape(), *flags)
    report = run_parity(checkpoint, str(llm), str(visual), [str(image)], "Describe the image.", 16)
    assert report["compute"] == {"visual": compute, "llm": compute}
    assert not failures(report), failures(report)
    assert report["greedy"]["identical_tokens"] == 16
