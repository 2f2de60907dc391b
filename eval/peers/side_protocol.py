"""What every peer side process shares. The sides run under the peers' own Pythons, so this module uses the
standard library only; they import it from their folder, vlmc's bench imports it as a module of the package.

Protocol: one JSON request per line on stdin ({"figure", "count"} or {"final": true}), one JSON answer per line on
the stdout the process started with; native libraries' prints go to stderr."""

import json
import os
import resource
import sys


def open_answers():
    """The protocol's channel: the original stdout. File descriptor 1 then points at stderr."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return answers


def peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM, which starts afresh at exec (getrusage's ru_maxrss keeps the
    parent's peak across fork + exec, so a side process would report at least the bench process's size)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def serve(answers, figure, settings: dict, load_s: float, final) -> None:
    """Answer the parent: each figure once on the warm-up image (another image: nothing a timed call could reuse),
    then `count` timed calls on the image; figure(name, image) returns seconds (the parent asks only for the
    figures bench.PEER_FIGURES names). final() adds the last figures (tokens, notes)."""
    answers.write(json.dumps({"ready": True, "load_s": load_s}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("final"):
            answers.write(json.dumps({"peak_rss_mib": peak_rss_mib(), "load_s": load_s, **final()}) + "\n")
            break
        figure(request["figure"], settings["warmup_image"])
        answers.write(json.dumps({"times": [figure(request["figure"], settings["image"])
                                            for _ in range(request["count"])]}) + "\n")
