"""`vlmc eval parity`: run transformers and vlmc on the same inputs and report, stage by stage, where they differ.

Stages: host preprocessing, image embeddings (per image), prefill logits, decode logits (per step, while the
greedy tokens agree) and the number of identical greedy tokens before the first divergence. A stage over its
threshold makes the command exit non-zero and names the stage.

Two tiers for reduced-precision artifacts:
- Tier A (the gate, the stages above): the reference computes with the artifact's own effective weights
  (transformers' model with fake-quant weights). For a bf16/int8 KV cache the language-model reference is vlmc's
  deploy model in PyTorch, through the same engine and the same cache rounding. Thresholds as for fp32.
- Tier B (`quality`, reported): unquantized transformers against the artifacts, teacher-forced along its own greedy
  tokens: KL divergence of the next-token distributions (mean, p99), top-1 agreement, top-5 containment both ways,
  and the first step where vlmc's greedy token differs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Defaults by dtype: image embedding relative error, and logits max abs diff relative to the largest reference logit.
# Relative, because fp32 rounding grows with the logits' scale: a 2048-wide model with logits near 20 differs from
# transformers by about 1e-3 (5e-5 of the scale; summation order of two fp32 BLAS libraries), a 512-wide one by 3e-5.
# bf16 GEMM inputs (backend.compute: bf16): the reference rounds the same inputs, but an activation an fp32
# accumulation-order difference away from a rounding boundary rounds the other way (2^-9 of its value), and such
# flips add up through the layers: thresholds measured on the test presets (docs/eval.md).
# int8 GEMM inputs (backend.compute: int8): the same, one int8 step (1/127 of the row's largest input) per flip;
# measured on the tiny preset: image embeddings 1e-6 to 7e-3, prompt logits 4e-7 to 1.5e-2.
# int8 decode inputs (backend.decode_compute: int8): an input that fp32 summation order moves across an int8 rounding
# boundary lands 1/127 of its block's largest input away. Measured on the tiny preset: most decode steps 1e-7, a
# step with such a flip 9e-3 to 1.4e-2 (the next step is back near 1e-7); the image embeddings are untouched.
THRESHOLDS = {"fp32": {"embedding_rel": 1e-4, "logits_rel": 1e-4},
              "bf16": {"embedding_rel": 2e-2, "logits_rel": 2e-2},
              "int8": {"embedding_rel": 5e-2, "logits_rel": 5e-2},
              "int8_decode_inputs": {"embedding_rel": 1e-4, "logits_rel": 5e-2}}


def limits_of(report: dict) -> dict:
    """The thresholds that apply: fp32's; int8's or bf16's when either artifact takes int8 or bf16 GEMM inputs; else
    int8 decode inputs' when the LLM artifact takes them."""
    computes = report.get("compute", {}).values()
    for compute in ("int8", "bf16"):
        if compute in computes:
            return THRESHOLDS[compute]
    return THRESHOLDS["int8_decode_inputs" if report.get("decode_compute") == "int8" else "fp32"]


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

    from ..runtime.cpu_ops.vision import build_visual_inputs
    from ..runtime.visual.runtime import split_output_groups

    if visual.tiled:
        from ..errors import VlmcError

        raise VlmcError("--backend onnxruntime checks native-resolution visual graphs only, not tiling ones")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}  # the exporter drops inputs the graph does not use
    out = []
    for source in images:
        pixels, grid, _ = visual.prepare(source, visual.image_config())
        inputs = build_visual_inputs(pixels, grid, visual.spec.vision, visual.budget)
        feeds = {n: a for n, a in zip(visual.input_names, inputs.as_args(visual.input_names)) if n in wanted}
        groups = split_output_groups(session.run(None, feeds), visual.output_groups, inputs.num_tokens,
                                     inputs.reverse_index)
        out.append(groups["embeddings"])
    return out


def run_parity(checkpoint: str, model: str, vit_model: str | None, images: list[str], prompt: str,
               max_new_tokens: int, backend: str = "tvm", device: str = "cpu") -> dict:
    import torch
    from PIL import Image

    onnx = onnx_path(vit_model, images) if backend == "onnxruntime" else None

    from ..build_in.source_code import detect_architecture, get_architecture
    from ..runtime.llm.engine import splice_image_embeddings
    from ..runtime.llm.pipeline import Pipeline

    from ..compile.quantize import Scheme

    arch = get_architecture(detect_architecture(checkpoint))
    reference = arch.reference
    pipe = Pipeline(model, vit_model, device, same_checkpoint=False)  # a foreign visual artifact must show up
    text_scheme = Scheme.from_dict(pipe.llm.manifest.get("quantize"), pipe.llm.manifest.get("compute", "fp32"),
                                   pipe.llm.manifest.get("decode_compute", "fp32"))
    vision_scheme = (Scheme.from_dict(pipe.visual.manifest.get("quantize"), pipe.visual.manifest.get("compute", "fp32"))
                     if pipe.visual else Scheme())
    quantized = text_scheme.changes_numerics or vision_scheme.changes_numerics
    if device != "cpu":  # transformers on the same GPU, in true fp32 (TF32 would be the drift we measure)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    hf = reference.load_model(checkpoint).to(device)  # unquantized: tier B
    hf_a = reference.load_model(checkpoint, vision_scheme, text_scheme).to(device) if quantized else hf  # tier A
    try:
        spec = pipe.spec
        # A tiling artifact caps the tiles per image: the reference's processor gets the same cap
        limits = {"max_tiles": pipe.visual.budget} if pipe.visual is not None and pipe.visual.tiled else {}
        ref = reference.reference_inputs(checkpoint, [Image.open(p) for p in images], prompt, model=hf, **limits)
        report: dict = {"inputs": {"images": images, "prompt": prompt, "max_new_tokens": max_new_tokens},
                        "dtype": pipe.llm.manifest["dtype"], "device": device,
                        "compute": {"visual": vision_scheme.compute, "llm": text_scheme.compute},
                        "decode_compute": text_scheme.decode_compute,
                        "quantize": {"visual": vision_scheme.to_dict(kv_cache=False), "llm": text_scheme.to_dict()},
                        "reference": ("vlmc's deploy model in PyTorch (same weights and KV cache rounding)"
                                      if text_scheme.kv_cache != "fp32" else
                                      "transformers with the artifacts' effective weights and GEMM input rounding"
                                      if quantized else
                                      "transformers")}

        # 1. Host preprocessing: vlmc's host ops against the reference processor.
        image_embeds, grids, _ = pipe.encode_images(images)
        ids = spec.prompt_ids(pipe.tokenizer, prompt, grids)
        positions, delta = spec.positions(ids, grids)
        ref_ids = reference.as_numpy(ref["input_ids"])[0]
        host = {"input_ids_equal": bool(np.array_equal(ids, ref_ids)),
                "position_ids_equal": bool(ids.shape == ref_ids.shape and np.array_equal(
                    positions, reference.as_numpy(ref["position_ids"])[:, 0])),
                "rope_deltas_equal": delta == int(ref["rope_deltas"][0])}
        if images:
            host["image_grid_thw_equal"] = bool(np.array_equal(grids, reference.as_numpy(ref["image_grid_thw"])))
        report["host"] = host

        # 2. Image embeddings, per image.
        # Every other output group too (e.g. deepstack features, [count, tokens, hidden]), named in the report, so
        # a tower that drops or breaks one fails here and not only, unexplained, in the logits.
        image_extras = pipe.last_image_extras
        hf_embeds, hf_extras = None, {}
        if images:
            hf_outputs = reference.vision_outputs(hf_a, ref["pixel_values"], ref["image_grid_thw"])
            hf_embeds = hf_outputs.pop("embeddings")
            hf_extras = hf_outputs
            report["image_embedding_rel_error"] = _per_image(image_embeds, hf_embeds, axis=0)
            groups = set(hf_extras) | {g for outputs in image_extras for g in outputs}
            report["visual_output_rel_error"] = {
                g: _per_image([o.get(g) for o in image_extras], hf_extras.get(g), axis=1) for g in sorted(groups)}
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
        embeds = splice_image_embeddings(pipe.engine.embed.lookup(ids), ids, spec.text.image_token_id, image_embeds)
        extras = pipe.prompt_extras(ids, image_extras)
        hf_tokens, hf_logits = reference.generate_reference(hf, ref, max_new_tokens, with_logits=True)
        if text_scheme.kv_cache != "fp32":  # the cache rounding exists in vlmc's deploy model only
            ref_embeds = embeds if hf_embeds is None else splice_image_embeddings(
                pipe.engine.embed.lookup(ids), ids, spec.text.image_token_id, [hf_embeds])
            ref_extras = extras if hf_embeds is None else pipe.prompt_extras(ids, [hf_extras])
            ref_tokens, ref_logits = _deploy_reference(arch, checkpoint, text_scheme, pipe, ref_embeds, ref_extras,
                                                       positions, delta, max_new_tokens)
        elif hf_a is not hf:
            ref_tokens, ref_logits = reference.generate_reference(hf_a, ref, max_new_tokens, with_logits=True)
        else:
            ref_tokens, ref_logits = hf_tokens, hf_logits
        eos = list(spec.text.eos_token_ids)
        tokens, steps = [], []
        with _slot(pipe) as seq:
            seq.rope_delta = delta
            logits = pipe.engine.prefill(seq, embeds, positions, extras)
            report["prefill_logits"] = _logit_stats(logits, ref_logits[0])
            while len(tokens) < len(ref_tokens):
                tokens.append(_greedy(logits, eos))
                if tokens[-1] != ref_tokens[len(tokens) - 1] or len(tokens) == len(ref_tokens):
                    break
                logits = pipe.decode_step(seq, tokens[-1])
                steps.append(_logit_stats(logits, ref_logits[len(tokens)]))
        same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(tokens))
        report["decode_logits"] = steps
        report["greedy"] = {"identical_tokens": same, "compared": len(ref_tokens), "vlmc": tokens,
                            "transformers": ref_tokens}

        # Tier B: unquantized transformers, teacher-forced along its own greedy tokens.
        ours = []
        with _slot(pipe) as seq:
            seq.rope_delta = delta
            ours.append(pipe.engine.prefill(seq, embeds, positions, extras))
            for token in hf_tokens[:-1]:
                ours.append(pipe.decode_step(seq, token))
        report["quality"] = quality(ours, hf_logits, hf_tokens, eos)
        return report
    finally:
        pipe.close()


class _slot:
    """Cache slot 0 of the pipeline for one sequence, released afterwards."""

    def __init__(self, pipe):
        from ..runtime.llm.engine import Sequence

        self.pipe, self.seq = pipe, Sequence(0, 0)

    def __enter__(self):
        return self.seq

    def __exit__(self, *exc):
        self.pipe.engine.release(self.seq)


def _greedy(logits: np.ndarray, eos: list[int]) -> int:
    """The greedy token with EOS suppressed, as the reference generates (min_new_tokens)."""
    return int(np.argmax(np.where(np.isin(np.arange(logits.size), eos), -np.inf, logits)))


def _per_image(ours: list, theirs, axis: int) -> list[float]:
    """Relative error of each image's output against its slice (along the token axis) of the reference's output
    for all images; inf where one side lacks it or the shapes differ."""
    errors, offset = [], 0
    for mine in ours:
        if mine is None or theirs is None:
            errors.append(float("inf"))
            continue
        part = np.take(theirs, range(offset, offset + mine.shape[axis]), axis=axis)
        offset += mine.shape[axis]
        errors.append(_rel(mine, part) if part.shape == mine.shape else float("inf"))
    return errors


def _deploy_reference(arch, checkpoint, scheme, pipe, embeds, extras, positions, delta, max_new_tokens):
    """Greedy tokens and logits of vlmc's deploy language model in PyTorch (eager, tp 1) with the artifact's weights
    and KV cache format, through the same engine: the tier-A reference of a bf16/int8-cache artifact."""
    from ..runtime.llm.engine import LLMEngine, Sequence
    from ..runtime.llm.torch_step import TorchStep

    from ..compile.llm import FP32_LAYERS
    from ..compile.quantize import GRAPH_COMPUTE, set_compute

    config = arch.load_config(checkpoint).text_config
    step = TorchStep(arch.load_language_model(checkpoint, config, scheme=scheme))

    current = {"compute": None}

    def with_compute(compute):  # the prompt graphs' GEMM inputs, and the decode graph's (set when they change)
        def call(*arrays):
            if current["compute"] != compute:  # decode_compute: int8 covers the lm_head too (compile/llm.py)
                set_compute(step.module, compute, keep=FP32_LAYERS if compute != "int8" else ())
                current["compute"] = compute
            return step(*arrays)
        return call

    shape = pipe.llm.cache_shape()
    shape.kv_heads = config.num_key_value_heads  # one rank holds every KV head
    engine = LLMEngine({pipe.engine.max_prefill: with_compute(GRAPH_COMPUTE[scheme.compute])},
                       with_compute(scheme.decode_compute),
                       pipe.spec.text,
                       pipe.engine.embed, shape, prefill_extras=pipe.engine.prefill_extras)
    seq, eos = Sequence(0, delta), list(pipe.spec.text.eos_token_ids)
    logits = [engine.prefill(seq, embeds, positions, extras)]
    tokens = [_greedy(logits[0], eos)]
    while len(tokens) < max_new_tokens:
        logits.append(engine.decode([seq], [tokens[-1]])[0])
        tokens.append(_greedy(logits[-1], eos))
    return tokens, logits


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def quality(ours: list[np.ndarray], theirs: list[np.ndarray], their_tokens: list[int], eos: list[int]) -> dict:
    """Tier B: teacher-forced next-token distributions (ours[i] and theirs[i] after the same prefix): KL(theirs ||
    ours) mean and p99, top-1 agreement, top-5 containment both ways (each side's top-1 in the other's top-5), and
    the first step where our greedy token differs from theirs (len(steps): never)."""
    kl, top1, top5 = [], [], []
    for a, b in zip(ours, theirs):
        la, lb = _log_softmax(a), _log_softmax(b)
        kl.append(float(np.sum(np.exp(lb) * (lb - la))))
        top1.append(int(np.argmax(a)) == int(np.argmax(b)))
        five_a, five_b = set(np.argsort(a)[-5:].tolist()), set(np.argsort(b)[-5:].tolist())
        top5.append(int(np.argmax(a)) in five_b and int(np.argmax(b)) in five_a)
    first = next((i for i, (a, t) in enumerate(zip(ours, their_tokens)) if _greedy(a, eos) != t), len(ours))
    return {"kl_mean": float(np.mean(kl)), "kl_p99": float(np.percentile(kl, 99)), "kl_per_step": kl,
            "top1_agreement": float(np.mean(top1)), "top5_containment": float(np.mean(top5)),
            "first_divergence": first, "steps": len(kl)}


def failures(report: dict) -> list[str]:
    limits = limits_of(report)
    out = [f"host: {k} is false" for k, v in report["host"].items() if not v]
    for i, err in enumerate(report.get("image_embedding_rel_error", [])):
        if not err <= limits["embedding_rel"]:
            out.append(f"image_embedding[{i}]: relative error {err:.3g} > {limits['embedding_rel']}")
    for group, errors in report.get("visual_output_rel_error", {}).items():
        for i, err in enumerate(errors):
            if not err <= limits["embedding_rel"]:
                out.append(f"visual output {group!r} of image {i}: relative error {err:.3g} > {limits['embedding_rel']}")
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
    limit = limits_of(report)["logits_rel"]
    plot = folder / "logits_error.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, kl_ax) = plt.subplots(1, 2, figsize=(11, 3))
    ax.semilogy(range(len(steps)), np.maximum(steps, 1e-12), marker="o")
    ax.axhline(limit, color="red", linestyle="--", label="threshold")
    ax.legend()
    ax.set_xlabel("step (0 = prefill)")
    ax.set_ylabel("max |logits diff| / max |logit|")
    ax.set_title("tier A: vlmc vs its reference")
    q = report["quality"]
    kl_ax.semilogy(range(len(q["kl_per_step"])), np.maximum(q["kl_per_step"], 1e-16), marker="o")
    kl_ax.set_xlabel("step (teacher-forced)")
    kl_ax.set_ylabel("KL(transformers || vlmc)")
    kl_ax.set_title(f"tier B: KL mean {q['kl_mean']:.2g}, top-1 {q['top1_agreement']:.3f}, "
                    f"top-5 {q['top5_containment']:.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(plot)
    plt.close(fig)
    lines = ["# Parity report: vlmc vs transformers", "",
             f"dtype: {report['dtype']}, device: {report.get('device', 'cpu')}, weights: visual "
             f"{report['quantize']['visual']['weights']}, LLM {report['quantize']['llm']['weights']}, KV cache "
             f"{report['quantize']['llm']['kv_cache']}, GEMM inputs: visual {report['compute']['visual']}, LLM prompt "
             f"{report['compute']['llm']}, LLM decode {report.get('decode_compute', 'fp32')}", f"tier-A reference: {report['reference']}", "",
             "| stage | result |",
             "|---|---|"]
    lines += [f"| host: {k} | {v} |" for k, v in report["host"].items()]
    for i, err in enumerate(report.get("image_embedding_rel_error", [])):
        lines.append(f"| image {i} embedding relative error | {err:.3g} |")
    for group, errors in report.get("visual_output_rel_error", {}).items():
        lines += [f"| image {i} visual output {group!r} relative error | {err:.3g} |" for i, err in enumerate(errors)]
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
    q = report["quality"]
    lines.append(f"| tier B vs unquantized transformers | KL mean {q['kl_mean']:.3g}, p99 {q['kl_p99']:.3g}; top-1 "
                 f"agreement {q['top1_agreement']:.3f}; top-5 containment {q['top5_containment']:.3f}; first "
                 f"greedy divergence at step {q['first_divergence']} of {q['steps']} |")
    failed = failures(report)
    lines += ["", "Result: " + ("PASS" if not failed else "FAIL: " + "; ".join(failed)), "",
              f"![per-step logits error]({plot.name})", ""]
    (folder / "report.md").write_text("\n".join(lines))
    return folder / "report.md"
