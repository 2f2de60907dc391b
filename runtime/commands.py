"""Runtime subcommands: preprocess (host ops only), encode (visual graph), generate (whole request)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from ..errors import VlmcError


def register(sub) -> None:
    p = sub.add_parser(
        "preprocess", help="run the host ops on images and a prompt and save what the graphs would get",
        description="Run vlmc's host ops (image loading, resize, normalisation, patches or tiles, chat template, "
                    "image token expansion, positions) and write pixel_values (patches [n, patch_dim], or tiles "
                    "[n, 3, S, S] for tiling models), image_grid_thw (each image's layout: (t, h, w) patches, or "
                    "(tiles, rows, columns)), input_ids, position_ids [3, seq] and rope_deltas to an .npz file. "
                    "With --video also pixel_values_videos, video_grid_thw, second_per_grid_ts and the sampled "
                    "frames' video_timestamps and video_frame_indices (all videos' in a row; video_num_frames says "
                    "how many belong to each). Uses only the checkpoint's tokenizer and configs, never transformers' "
                    "processor.")
    p.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint folder")
    p.add_argument("--image", action="append", default=[],
                   help="image path, file:// URL or data: URI; repeat for several images (in prompt order)")
    p.add_argument("--prompt", required=True, help="user text, placed after the images and videos")
    p.add_argument("--out", required=True, help="output .npz path")
    p.add_argument("--min-pixels", type=int, help="lower bound on resized pixels (default: the checkpoint's)")
    p.add_argument("--max-pixels", type=int, help="upper bound on resized pixels (default: the checkpoint's)")
    p.add_argument("--max-tiles", type=int, help="tiling models: the most tiles an image is cut into, its thumbnail "
                                                 "not counted (default: the checkpoint's)")
    add_video_args(p)
    p.set_defaults(func=run_preprocess)
    register_inference(sub)


def add_video_args(p) -> None:
    p.add_argument("--video", action="append", default=[],
                   help="video path, file:// URL or data: URI (mp4, webm, mkv, avi, gif, ...); repeatable, placed "
                        "after the images")
    sampling = p.add_mutually_exclusive_group()
    sampling.add_argument("--fps", type=float,
                          help="frames sampled per second of video (default: the checkpoint's, 2), between the "
                               "processor's min and max frame counts")
    sampling.add_argument("--num-frames", type=int, help="sample this many frames, evenly spaced, instead of an fps")
    p.add_argument("--max-frames", type=int, help="the most frames sampled from one video (default: the "
                                                   "checkpoint's, 768)")
    p.add_argument("--video-min-pixels", type=int, help="lower bound on each frame's resized pixels (default: the "
                                                        "checkpoint's video processor's)")
    p.add_argument("--video-max-pixels", type=int, help="upper bound on each frame's resized pixels (default: the "
                                                        "checkpoint's video processor's)")
    p.add_argument("--max-video-seconds", type=float, default=600.0,
                   help="refuse a video longer than this (default: 600)")


def video_request(args):
    """The sampling flags as a VideoRequest (its checks give one-line errors)."""
    from .cpu_ops.video import VideoRequest

    return VideoRequest(fps=args.fps, num_frames=args.num_frames, max_frames=args.max_frames,
                        min_pixels=args.video_min_pixels, max_pixels=args.video_max_pixels,
                        max_seconds=args.max_video_seconds)


def run_preprocess(args) -> int:
    from transformers import AutoTokenizer

    from ..build_in.source_code import detect_architecture, get_architecture
    from .cpu_ops.pipeline import prepare_prompt
    from .cpu_ops.video import describe_video

    arch = get_architecture(detect_architecture(args.checkpoint))
    spec = arch.host_spec(args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    image_cfg = spec.image.with_pixels(args.min_pixels, args.max_pixels)
    if args.max_tiles is not None and not spec.tiled:
        raise VlmcError("--max-tiles applies to models that cut images into tiles; use --max-pixels")
    if args.max_tiles is not None and args.max_tiles <= 0:
        raise VlmcError("--max-tiles must be positive")
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        raise VlmcError(f"output folder {out.parent} does not exist")
    request = video_request(args)
    prepared = prepare_prompt(tokenizer, spec, args.image, args.prompt, image_config=image_cfg,
                              budget=args.max_tiles, videos=args.video, video_request=request)
    arrays = dict(pixel_values=prepared.pixel_values, image_grid_thw=prepared.image_grid_thw,
                  input_ids=prepared.input_ids, position_ids=prepared.position_ids,
                  rope_deltas=np.asarray(prepared.rope_deltas, dtype=np.int64))
    if args.video:
        videos = prepared.videos
        arrays.update(pixel_values_videos=prepared.pixel_values_videos, video_grid_thw=prepared.video_grid_thw,
                      second_per_grid_ts=prepared.second_per_grid_ts,
                      video_timestamps=np.concatenate([np.asarray(v.timestamps, np.float64) for v in videos]),
                      video_frame_indices=np.concatenate([np.asarray(v.frame_indices, np.int64) for v in videos]),
                      video_num_frames=np.asarray([len(v.frame_indices) for v in videos], np.int64))
    np.savez(out, **arrays)
    unit = "tiles" if spec.tiled else "patches"
    videos = "".join(f", video {describe_video(src)!r}: {len(v.frame_indices)} frames at "
                     f"{', '.join(f'{t:.2f}' for t in v.timestamps[:8])}{' ...' if len(v.timestamps) > 8 else ''} s,"
                     f" grid {list(v.grid_thw)}" for src, v in zip(args.video, prepared.videos))
    print(f"{len(args.image)} image(s), {len(args.video)} video(s), {prepared.num_tokens} tokens, "
          f"{prepared.pixel_values.shape[0]} {unit}{videos} -> {out}")
    return 0


def register_inference(sub) -> None:
    v = sub.add_parser(
        "verify", help="check every file of compiled artifacts against the full hashes in their manifests",
        description="Read every file of each artifact and compare its size and sha256 with the manifest. Loading an "
                    "artifact (generate, encode, serve) checks sizes and the first and last MiB of each file only, "
                    "so that a start does not read gigabytes twice; run this after copying artifacts between hosts, "
                    "or pass --verify to those commands.")
    v.add_argument("artifacts", nargs="+", metavar="ARTIFACT", help="artifact folders")
    v.set_defaults(func=run_verify)

    p = sub.add_parser(
        "encode", help="encode one image through a compiled visual artifact",
        description="Run one image through the compiled visual graph and write its embeddings [visual tokens, "
                    "hidden] as float32 .npy, in the order transformers produces them. A graph with more output "
                    "groups (e.g. Qwen3-VL's deepstack features, [layers, visual tokens, hidden]) writes each next "
                    "to --out as OUT.<group>.npy. An image over the compiled patch budget is resized to fit; a "
                    "tiling model cuts it into at most the compiled number of tiles.")
    p.add_argument("--vit_model", "--vit-model", dest="vit_model", required=True, help="visual artifact folder")
    p.add_argument("--image", required=True, help="image path, file:// URL or data: URI")
    p.add_argument("--out", required=True, help="output .npy path")
    p.add_argument("--min-pixels", type=int, help="lower bound on resized pixels (default: the artifact's)")
    p.add_argument("--max-pixels", type=int, help="upper bound on resized pixels (default: the artifact's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N; must match the artifact's target "
                                                   "(default: cpu)")
    p.add_argument("--verify", action="store_true", help="check every file's full hash first (see vlmc verify)")
    p.set_defaults(func=run_encode)

    g = sub.add_parser(
        "generate", help="answer one prompt with images and videos offline with compiled artifacts",
        description="Host ops -> visual graph -> image and video embeddings spliced into the prompt -> prefill -> "
                    "decode until EOS or --max-new-tokens. Greedy unless --temperature is given. A video runs "
                    "through the visual graph as whole temporal patches, as many per call as its patch budget "
                    "holds; its frames are made smaller only when one temporal patch would not fit (the --json "
                    "output's `videos` says so). With tp > 1 the LLM artifact's ranks run as separate processes "
                    "linked by torch.distributed (gloo).")
    g.add_argument("--model", required=True, help="LLM artifact folder")
    g.add_argument("--vit_model", "--vit-model", dest="vit_model", help="visual artifact folder (needed for images)")
    g.add_argument("--image", action="append", default=[], help="image path, file:// URL or data: URI; repeatable")
    g.add_argument("--prompt", help="user text, placed after the images and videos (required on node 0)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="generated token limit (default: 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all")
    g.add_argument("--seed", type=int, help="sampling seed")
    g.add_argument("--ignore-eos", action="store_true",
                   help="never stop at EOS: generate exactly --max-new-tokens tokens (fixed-length benchmarks)")
    g.add_argument("--min-pixels", type=int, help="lower bound on resized pixels")
    g.add_argument("--max-pixels", type=int, help="upper bound on resized pixels")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N; must match the artifacts' target "
                                                   "(default: cpu)")
    add_video_args(g)
    g.add_argument("--verify", action="store_true", help="check every artifact file's full hash first (see vlmc "
                                                         "verify)")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object (text, token_ids, prompt_tokens, timings, images, videos) as the "
                        "last line")
    from .llm.cluster import add_cluster_args

    add_cluster_args(g)
    g.set_defaults(func=run_generate)


def run_verify(args) -> int:
    import time

    from .artifact import read_manifest

    for folder in args.artifacts:
        t0 = time.perf_counter()
        manifest = read_manifest(folder, verify=True)
        total = sum(info["bytes"] for info in manifest["files"].values())
        print(f"{folder}: {manifest['kind']} artifact, {len(manifest['files'])} files, {total / 2**20:.1f} MiB, "
              f"all hashes match ({time.perf_counter() - t0:.1f} s)")
    return 0


def run_encode(args) -> int:
    from .artifact import tvm_runtime_only

    tvm_runtime_only(args.vit_model)
    from .visual.runtime import VisualRuntime

    runtime = VisualRuntime(args.vit_model, args.device, verify=args.verify)
    encoded = runtime.encode(args.image, args.min_pixels, args.max_pixels)
    np.save(args.out, encoded.embeddings)
    out = Path(args.out)
    stem = out.with_suffix("") if out.suffix == ".npy" else out
    for group, array in encoded.extras.items():
        np.save(f"{stem}.{group}.npy", array)
    h, w = encoded.resized_to
    if runtime.tiled:
        tiles, rows, cols = encoded.grid_thw
        note = f" (capped at the compiled {runtime.budget} tiles)" if encoded.fitted else ""
        shape = f"{rows}x{cols} tiles{' + the whole image as one' if tiles > rows * cols else ''}{note}"
    else:
        note = " (resized to fit the compiled patch budget)" if encoded.fitted else ""
        shape = f"grid {list(encoded.grid_thw)}{note}"
    print(f"image resized to {w}x{h}, {shape}, "
          f"{encoded.embeddings.shape[0]} visual tokens x {encoded.embeddings.shape[1]} -> {args.out}")
    return 0


def run_generate(args) -> int:
    import json

    from .artifact import tvm_runtime_only

    tvm_runtime_only(args.model, args.vit_model)
    from .cpu_ops.sampling import SamplingParams
    from .llm.pipeline import Pipeline

    from .llm.cluster import cluster_from_args
    from .llm.runtime import host_ranks

    cluster = cluster_from_args(args)
    if cluster.node_rank > 0:  # this node only runs its ranks, until node 0's generate is done
        return host_ranks(args.model, cluster, args.device, rejoin=False, verify=args.verify)
    if args.prompt is None:
        raise VlmcError("--prompt is required (on node 0)")
    if args.max_new_tokens <= 0:
        raise VlmcError("--max-new-tokens must be positive")
    request = video_request(args)
    started = time.perf_counter()
    pipeline = Pipeline(args.model, args.vit_model, args.device, verify=args.verify, cluster=cluster)
    load_s = time.perf_counter() - started  # artifacts, graphs, weights, tokenizer (and TVM's import)
    try:
        result = pipeline.generate(args.image, args.prompt, args.max_new_tokens, SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
            ignore_eos=args.ignore_eos),
            min_pixels=args.min_pixels, max_pixels=args.max_pixels, videos=args.video, video_request=request)
    finally:
        pipeline.close()
    result.timings["load_s"] = round(load_s, 6)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(result.text)
        for video in result.videos:
            fitted = ", frames shrunk to fit the visual graph's patch budget" if video["fitted_to_budget"] else ""
            print(f"[video: {video['frames']} frames sampled of {video['source']['frames']}, grid "
                  f"{video['grid_thw']}, {video['graph_calls']} visual graph call(s){fitted}]", file=sys.stderr)
        t = result.timings
        print(f"[{result.prompt_tokens} prompt tokens, {len(result.token_ids)} generated ({result.finish_reason}); "
              f"load {load_s:.2f}s, visual {t['visual_s']:.3f}s, prefill {t['prefill_s']:.3f}s, "
              f"decode {t['decode_per_token_s'] or 0:.4f}s/token]", file=sys.stderr)
    return 0
