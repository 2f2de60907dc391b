"""Compile a checkpoint's language model into tensor-parallel prefill and decode graphs through TVM.

One graph per shape serves every rank (the all-reduce is a packed call the runtime provides); parameters are
saved per rank. The artifact also carries the embedding table, tokenizer, chat template and generation config,
so it alone (with a visual artifact) serves requests.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from ..build_in.source_code import detect_architecture, get_architecture
from ..errors import VlmcError
from ..runtime.llm.collective import CUSTOM_CONVERTERS as COLLECTIVE_CONVERTERS
from ..runtime.llm.collective import all_reduce
from ..runtime.llm.engine import CacheShape
from .artifact import Stages, library_versions, staging_folder, weights_fingerprint, write_manifest
from .config import LLMConfig, config_hash, resolve_checkpoint
from .ops import CUSTOM_CONVERTERS as OPS_CONVERTERS, use_host_kernels, uses_attention_kernel
from .quantize import (GRAPH_COMPUTE, QuantizationError, check_int8_input_blocks, check_target, set_compute,
                       weight_layout)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "config.json", "preprocessor_config.json")


# Layers whose GEMMs keep fp32 inputs whatever backend.compute says: the logits stay fp32.
FP32_LAYERS = ("lm_head",)
KV_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}


def graph_inputs(batch: int, seq: int, hidden: int, head_dim: int, layers: int, kv_heads: int, context: int,
                 kv_cache: str = "fp32"):
    """Example inputs of the deploy LLM graph (the shapes it is compiled for); context 0: no cache inputs and key
    ranges instead of a mask (prefill graphs, which always start on an empty cache slot). An int8 cache adds one
    fp32 scale per (slot, kv head, position) for keys and values of each layer."""
    dtype = KV_DTYPES[kv_cache]
    caches = [torch.zeros(batch, kv_heads, context, head_dim, dtype=dtype) for _ in range(2 * layers if context else 0)]
    if context and kv_cache == "int8":
        caches += [torch.zeros(batch, kv_heads, context) for _ in range(2 * layers)]
    mask = torch.zeros(batch, 1, seq, context + seq) if context else torch.zeros(seq, 2, dtype=torch.int32)
    return (torch.zeros(batch, seq, hidden), torch.zeros(batch, seq, head_dim), torch.zeros(batch, seq, head_dim),
            mask, *caches)


def embedding_array(table: torch.Tensor, scheme) -> np.ndarray:
    """The host's token embedding table: fp32, or bf16 (stored as its uint16 bits) for every reduced-precision
    weight scheme; the host widens the rows it gathers."""
    if not scheme.quantizes_weights:
        return table.float().numpy()
    return table.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def prefill_buckets(cfg: LLMConfig) -> list[int]:
    p = cfg.frontend.max_prefill
    # Default: 128, every 64 up to 512, every 128 up to 1024, every 256 up to 2048, then every 512: padding grows
    # with the prompt but stays under a quarter beyond 320 tokens (prefill cost grows with the padded length; each
    # bucket adds one graph, never weights).
    buckets = cfg.frontend.model_kwargs.prefill_buckets or [
        b for b in [*range(128, 513, 64), *range(640, 1025, 128), *range(1280, 2049, 256), *range(2560, p + 1, 512)]
        if b < p]
    return sorted(set(buckets) | {p})


def decode_buckets(cfg: LLMConfig) -> list[int]:
    """Batch sizes of the decode graphs: default 1, 2, 4, 8, ... below batch_size, and batch_size. A step runs
    the smallest that holds the running sequences, so one stream on a batch-16 artifact costs a batch-1 step."""
    kwargs = cfg.frontend.model_kwargs
    batch = kwargs.batch_size
    buckets = kwargs.decode_buckets or [2**i for i in range(batch.bit_length()) if 2**i < batch]
    return sorted(set(buckets) | {batch})


def compile_llm(cfg: LLMConfig, config_path: Path) -> Path:
    """Build the LLM artifact; returns its folder."""
    from . import tvm_backend

    checkpoint = resolve_checkpoint(cfg.frontend.checkpoint, config_path)
    out = Path(cfg.workspace.path) / cfg.name
    digest, weights = config_hash(cfg), weights_fingerprint(checkpoint)

    kwargs = cfg.frontend.model_kwargs
    tp, batch, context = kwargs.tp, kwargs.batch_size, cfg.frontend.context
    buckets, batches = prefill_buckets(cfg), decode_buckets(cfg)
    graphs = ([(f"prefill_{s}", 1, s, 0) for s in buckets]  # name, B, S, cache T
              + [(f"decode_{b}", b, 1, context) for b in batches])
    if tp > 1 and tvm_backend.target_device(cfg.backend.target) != "cpu":
        # The all-reduce is a torch.distributed (gloo) call on host memory; there is no GPU collective yet.
        raise VlmcError(f"tensor parallelism (tp={tp}) is supported on CPU targets only; compile for "
                        f"{cfg.backend.target} with --tp 1")
    target = tvm_backend.host_target(cfg.backend.target)
    scheme = cfg.quantize.scheme()
    check_target(scheme, target.kind.name, cfg.backend.compute, cfg.backend.decode_compute)
    stages = Stages(["load", "export", "import into TVM", "optimize", "build", "save"])
    with stages.stage("load", f"{checkpoint}, tp={tp}, weights {scheme.weights}, KV cache {scheme.kv_cache}"
                      + (f", {cfg.backend.compute} prompt GEMMs" if cfg.backend.compute != "fp32" else "")
                      + (f", {cfg.backend.decode_compute} decode GEMV inputs"
                         if cfg.backend.decode_compute != "fp32" else "")):
        arch_name = detect_architecture(checkpoint)
        arch = get_architecture(arch_name)
        model_config = arch.load_config(checkpoint)
        text = model_config.text_config
        spec = arch.host_spec(checkpoint, model_config)
        try:
            ranks = [arch.load_language_model(checkpoint, text, tp, r, all_reduce if tp > 1 else None, scheme)
                     for r in range(tp)]
        except QuantizationError as exc:
            raise VlmcError(f"cannot store {checkpoint} as {scheme.weights} at tp={tp}: {exc}") from None
        except ValueError as exc:
            raise VlmcError(f"cannot shard {checkpoint} over tp={tp}: {exc}") from None
        if cfg.backend.decode_compute == "int8" and tp > 1:
            check_int8_input_blocks(ranks[0], tp)
        plan = ranks[0].plan
        for module in ranks:
            use_host_kernels(module, uses_attention_kernel(target))
        embed = embedding_array(arch.embedding_table(checkpoint), scheme)
    dims = dict(hidden=text.hidden_size, head_dim=spec.text.head_dim, layers=text.num_hidden_layers,
                kv_heads=plan.num_kv_heads, kv_cache=scheme.kv_cache)
    exported = {}
    with stages.stage("export", f"{len(graphs)} graphs: " + ", ".join(g[0] for g in graphs)):
        for name, b, s, t in graphs:
            # prompt graphs (compute-bound) take backend.compute's GEMM inputs, decode (memory-bound)
            # backend.decode_compute's (int8: every int8/int4 layer, the lm_head too: it is a decode step's largest)
            if t:
                set_compute(ranks[0], cfg.backend.decode_compute)
            else:
                set_compute(ranks[0], GRAPH_COMPUTE[cfg.backend.compute], keep=FP32_LAYERS)
            # prompt graphs take the architecture's extra per-token inputs (e.g. deepstack features) last
            extras = tuple(ranks[0].prefill_extras(s).values()) if not t else ()
            exported[name] = tvm_backend.export_module(ranks[0], graph_inputs(b, s, context=t, **dims) + extras)
        param_names = list(exported[f"decode_{batch}"].graph_signature.parameters)
        if any(list(ep.graph_signature.parameters) != param_names for ep in exported.values()):
            raise VlmcError("internal error: the graphs of one artifact take their parameters in different orders")
    modules = {}
    with stages.stage("import into TVM"):
        for name, ep in exported.items():
            modules[name], _, _ = tvm_backend.import_exported(ep, {**COLLECTIVE_CONVERTERS, **OPS_CONVERTERS},
                                                                with_params=False)
    with stages.stage("optimize"):
        modules = {n: tvm_backend.optimize(m, target, blas=cfg.backend.blas) for n, m in modules.items()}
    with stages.stage("build", str(target.kind.name)):
        built = {n: tvm_backend.compile_module(m, target) for n, m in modules.items()}
    with stages.stage("save", str(out)), staging_folder(out) as tmp:
        for name, result in built.items():
            tvm_backend.save_library(result, tmp / f"{name}.so")
        for rank, module in enumerate(ranks):
            state = module.state_dict()
            tvm_backend.save_params([state[n] for n in param_names], param_names,
                                    tmp / f"rank_{rank}" / "params.safetensors")
        np.save(tmp / "embed_tokens.npy", embed)
        (tmp / "tokenizer").mkdir()
        for file in TOKENIZER_FILES:
            if (checkpoint / file).is_file():
                shutil.copy2(checkpoint / file, tmp / "tokenizer" / file)
        write_manifest(tmp, {
            "kind": "llm", "name": cfg.name, "arch": arch_name, "checkpoint": str(checkpoint),
            "tp": tp, "max_prefill": cfg.frontend.max_prefill, "context": context, "prefill_buckets": buckets,
            "batch_size": batch, "decode_buckets": batches,
            "graphs": {n: {"batch": b, "seq": s, "cache": t} for n, b, s, t in graphs},
            "layers": text.num_hidden_layers, "kv_heads_per_rank": plan.num_kv_heads, "head_dim": spec.text.head_dim,
            "hidden_size": text.hidden_size, "vocab_size": text.vocab_size, "param_names": param_names,
            # per-token visual features the prompt graphs take after the key ranges: [count, 1, S, hidden] each,
            # from the visual output group of the same name, zero off the image positions
            "prefill_extras": [{"name": n, "count": int(t.shape[0])} for n, t in ranks[0].prefill_extras(16).items()],
            "embed_tokens": {"file": "embed_tokens.npy", "shape": list(embed.shape),
                             "dtype": "bfloat16" if embed.dtype == np.uint16 else str(embed.dtype)},
            "quantize": scheme.to_dict(), "quantized_layers": weight_layout(ranks[0]),
            "weight_bytes": sum(t.numel() * t.element_size() for m in ranks for t in m.state_dict().values()),
            # all ranks together (KV heads replicated over ranks count on each)
            "kv_cache_bytes_per_token": CacheShape(text.num_hidden_layers, plan.num_kv_heads * tp, context,
                                                   spec.text.head_dim, scheme.kv_cache).bytes_per_token(),
            "dtype": cfg.backend.dtype, "compute": cfg.backend.compute,
            "decode_compute": cfg.backend.decode_compute, "target": str(target), "device": tvm_backend.target_device(target),
            "versions": library_versions(),
            "config_hash": digest, "weights_fingerprint": weights, "host": spec.to_dict(),
            "compile_seconds": stages.times,
        })
    return out
