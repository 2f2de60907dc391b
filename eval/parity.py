"""`vlmc eval parity`: run transformers and vlmc on the same inputs and report, stage by stage, where they differ.

Stages: host preprocessing, image embeddings (per image), prefill logits, decode logits (per step, while the
greedy tokens agree) and the number of identical greedy tokens before the first divergence. A stage over its
threshold makes the command exit non-zero and names the stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Defaults by dtype: image embedding relative error, and logits max abs diff relative to the largest reference logit.
# Relative, because fp32 rounding grows with the logits' scale: a 2048-wide model with logits near 20 differs from
# transformers by about 1e-3 (5e-5 of the scale; summation order of two fp32 BLAS libraries), a 512-wide one by 3e-5.
THRESHOLDS = {"fp32": {"embedding_rel": 1e-4, "logits_rel": 1e-4}}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))


def _logit_stats(ours: np.ndarray, ref: np.ndarray) -> dict:
    cos = float(np.dot(ours, ref) / (np.linalg.norm(ours) * np.linalg.norm(ref) + 1e-30))
    diff, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
    return {"max_abs_diff": diff, "max_abs_reference": scale, "rel_error": diff / max(scale, 1e-12), "cosine": cos,
            "top1_agree": bool(int(np.argmax(ours)) == int(np.argmax(ref)))}


def onnx_path(vit_model: str | None, images: list[str]) -> Path:
    """The visual artifact's ONNX export, checked before any model loads."""
    from ..errors import VlmcError

    if vit_model is None or not images:
        raise VlmcError("--backend onnxruntime checks the visual graph: pass --vit_model and at least one --image")
    path = Path(vit_model) / "model.onnx"
    if not path.is_file():
        raise VlmcError(f"the visual artifact {vit_model} has no ONNX export (model.onnx); recompile it with "
                        f"`vlmc compile VISUAL.yaml --onnx` (frontend.onnx: true)")
    return path


def onnx_embeddings(path: Path, visual, images: list[str]) -> list[np.ndarray]:
    """Image embeddings from the exported ONNX graph on onnxruntime, fed exactly what the TVM graph is fed."""
    import onnxruntime as ort

    from ..compile.visual import GRAPH_INPUTS
    from ..runtime.cpu_ops.vision import build_visual_inputs

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}  # the exporter drops inputs the graph does not use
    out = []
    for source in images:
        pixels, grid, _ = visual.patches(source, visual.image_config())
        inputs = build_visual_inputs(pixels, grid, visual.spec.vision, visual.budget)
        feeds = {n: a for n, a in zip(GRAPH_INPUTS, inputs.as_args()) if n in wanted}
        chunks = session.run(None, feeds)
        merged = np.concatenate(chunks, axis=-1) if len(chunks) > 1 else chunks[0]
        out.append(np.ascontiguousarray(merged[:inputs.num_tokens][inputs.reverse_index], dtype=np.float32))
    return out


def run_parity(checkpoint: str, model: str, vit_model: str | None, images: list[str], prompt: str,
               max_new_tokens: int, backend: str = "tvm", device: str = "cpu") -> dict:
    import torch
    from PIL import Image

    onnx = onnx_path(vit_model, images) if backend == "onnxruntime" else None

    from ..build_in.source_code import detect_architecture, get_architecture
    from ..runtime.cpu_ops.rope import get_rope_index
    from ..runtime.llm.engine import Sequence, splice_image_embeddings
    from ..runtime.llm.pipeline import Pipeline

    arch = get_architecture(detect_architecture(checkpoint))
    reference = arch.reference
    pipe = Pipeline(model, vit_model, device, same_checkpoint=False)  # a foreign visual artifact must show up
    hf = reference.load_model(checkpoint)
    if device != "cpu":  # transformers on the same GPU, in true fp32 (TF32 would be the drift we measure)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        hf = hf.to(device)
    try:
        spec = pipe.spec
        ref = reference.reference_inputs(checkpoint, [Image.open(p) for p in images], prompt, model=hf)
        report: dict = {"inputs": {"images": images, "prompt": prompt, "max_new_tokens": max_new_tokens},
                        "dtype": pipe.llm.manifest["dtype"], "device": device}

        # 1. Host preprocessing: vlmc's host ops against the reference processor.
        image_embeds, grids, _ = pipe.encode_images(images)
        from ..runtime.cpu_ops.prompt import tokenize_prompt

        ids = tokenize_prompt(pipe.tokenizer, prompt, grids, spec.text.image_token_id, spec.image.merge_size)
        positions, delta = get_rope_index(ids, grids, spec.text.image_token_id, spec.image.merge_size)
        ref_ids = reference.as_numpy(ref["input_ids"])[0]
        host = {"input_ids_equal": bool(np.array_equal(ids, ref_ids)),
                "position_ids_equal": bool(ids.shape == ref_ids.shape and np.array_equal(
                    positions, reference.as_numpy(ref["position_ids"])[:, 0])),
                "rope_deltas_equal": delta == int(ref["rope_deltas"][0])}
        if images:
            host["image_grid_thw_equal"] = bool(np.array_equal(grids, reference.as_numpy(ref["image_grid_thw"])))
        report["host"] = host

        # 2. Image embeddings, per image.
        if images:
            with torch.no_grad():
                hf_embeds = reference.as_numpy(hf.model.visual(ref["pixel_values"].to(hf.device),
                                                               grid_thw=ref["image_grid_thw"].to(hf.device))
                                               .pooler_output)
            errors, offset = [], 0
            for ours in image_embeds:
                theirs = hf_embeds[offset:offset + ours.shape[0]]
                offset += ours.shape[0]
                errors.append(_rel(ours, theirs) if theirs.shape == ours.shape else float("inf"))
            report["image_embedding_rel_error"] = errors
            if onnx is not None:  # the ONNX export against transformers, and against the TVM graph
                ort_embeds = onnx_embeddings(onnx, pipe.visual, images)
                offset, vs_hf = 0, []
                for ours in ort_embeds:
                    theirs = hf_embeds[offset:offset + ours.shape[0]]
                    offset += ours.shape[0]
                    vs_hf.append(_rel(ours, theirs) if theirs.shape == ours.shape else float("inf"))
                report["onnxruntime"] = {"image_embedding_rel_error": vs_hf, "vs_tvm_rel_error": [
                    _rel(o, t) if o.shape == t.shape else float("inf") for o, t in zip(ort_embeds, image_embeds)]}

        # 3-4. Prefill and decode logits while the greedy tokens agree.
        ref_tokens, ref_logits = reference.generate_reference(hf, ref, max_new_tokens, with_logits=True)
        embeds = splice_image_embeddings(pipe.engine.embed.lookup(ids), ids, spec.text.image_token_id, image_embeds)
        seq = Sequence(0, delta)
        tokens, steps = [], []
        try:
            logits = pipe.engine.prefill(seq, embeds, positions)
            report["prefill_logits"] = _logit_stats(logits, ref_logits[0])
            eos = set(spec.text.eos_token_ids)
            while len(tokens) < len(ref_tokens):
                token = int(np.argmax(np.where(np.isin(np.arange(logits.size), list(eos)), -np.inf, logits)))
                tokens.append(token)
                if token != ref_tokens[len(tokens) - 1] or len(tokens) == len(ref_tokens):
                    break
                logits = pipe.decode_step(seq, token)
                steps.append(_logit_stats(logits, ref_logits[len(tokens)]))
        finally:
            pipe.engine.release(seq)
        same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(tokens))
        report["decode_logits"] = steps
        report["greedy"] = {"identical_tokens": same, "compared": len(ref_tokens), "vlmc": tokens,
                            "transformers": ref_tokens}
        return report
    finally:
        pipe.close()


def failures(report: dict) -> list[str]:
    limits = THRESHOLDS.get(report["dtype"], THRESHOLDS["fp32"])
    out = [f"host: {k} is false" for k, v in report["host"].items() if not v]
    for i, err in enumerate(report.get("image_embedding_rel_error", [])):
        if not err <= limits["embedding_rel"]:
            out.append(f"image_embedding[{i}]: relative error {err:.3g} > {limits['embedding_rel']}")
    for i, err in enumerate(report.get("onnxruntime", {}).get("image_embedding_rel_error", [])):
        if not err <= limits["embedding_rel"]:
            out.append(f"onnxruntime image_embedding[{i}]: relative error {err:.3g} > {limits['embedding_rel']}")
    def logits(stage: str, stats: dict) -> str | None:
        if stats["rel_error"] <= limits["logits_rel"]:
            return None
        return (f"{stage}: max abs diff {stats['max_abs_diff']:.3g} is {stats['rel_error']:.3g} of the largest "
                f"reference logit ({stats['max_abs_reference']:.3g}) > {limits['logits_rel']}")

    if failure := logits("prefill_logits", report["prefill_logits"]):
        out.append(failure)
    for i, step in enumerate(report["decode_logits"]):
        if failure := logits(f"decode_logits[step {i + 1}]", step):
            out.append(failure)  # the first step over the threshold is enough
            break
    greedy = report["greedy"]
    if greedy["identical_tokens"] < greedy["compared"]:
        out.append(f"greedy_tokens: first divergence at token {greedy['identical_tokens']} of {greedy['compared']}")
    return out


def write_report(report: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "parity.json").write_text(json.dumps(report, indent=2) + "\n")
    steps = [report["prefill_logits"]["rel_error"]] + [s["rel_error"] for s in report["decode_logits"]]
    limit = THRESHOLDS.get(report["dtype"], THRESHOLDS["fp32"])["logits_rel"]
    plot = folder / "logits_error.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.semilogy(range(len(steps)), np.maximum(steps, 1e-12), marker="o")
    ax.axhline(limit, color="red", linestyle="--", label="threshold")
    ax.legend()
    ax.set_xlabel("step (0 = prefill)")
    ax.set_ylabel("max |logits diff| / max |logit|")
    ax.set_title("vlmc vs transformers")
    fig.tight_layout()
    fig.savefig(plot)
    plt.close(fig)
    lines = ["# Parity report: vlmc vs transformers", "",
             f"dtype: {report['dtype']}, device: {report.get('device', 'cpu')}", "", "| stage | result |",
             "|---|---|"]
    lines += [f"| host: {k} | {v} |" for k, v in report["host"].items()]
    for i, err in enumerate(report.get("image_embedding_rel_error", [])):
        lines.append(f"| image {i} embedding relative error | {err:.3g} |")
    ort_report = report.get("onnxruntime", {})
    for i, (err, tvm) in enumerate(zip(ort_report.get("image_embedding_rel_error", []),
                                       ort_report.get("vs_tvm_rel_error", []))):
        lines.append(f"| image {i} embedding relative error, onnxruntime | {err:.3g} (vs TVM {tvm:.3g}) |")
    p = report["prefill_logits"]
    lines.append(f"| prefill logits | max abs {p['max_abs_diff']:.3g} ({p['rel_error']:.3g} of the largest logit), "
                 f"cosine {p['cosine']:.6f}, top-1 {'agrees' if p['top1_agree'] else 'differs'} |")
    worst = max(report["decode_logits"], key=lambda s: s["rel_error"], default=None)
    if worst:
        lines.append(f"| decode logits ({len(report['decode_logits'])} steps) | worst max abs "
                     f"{worst['max_abs_diff']:.3g} ({worst['rel_error']:.3g} of the largest logit) |")
    g = report["greedy"]
    lines.append(f"| identical greedy tokens | {g['identical_tokens']} of {g['compared']} |")
    failed = failures(report)
    lines += ["", "Result: " + ("PASS" if not failed else "FAIL: " + "; ".join(failed)), "",
              f"![per-step logits error]({plot.name})", ""]
    (folder / "report.md").write_text("\n".join(lines))
    return folder / "report.md"
