"""`vlmc serve`: an OpenAI-compatible HTTP daemon over the visual and LLM runtimes.

Three processes linked by ZeroMQ: HTTP (FastAPI) -> visual worker -> LLM worker (continuous batching) -> HTTP.
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve compiled artifacts over an OpenAI-compatible HTTP API",
        description="Start an OpenAI-compatible server (POST /v1/chat/completions, GET /v1/models, /health, "
                    "/metrics) with a chat page at /. The visual encoder and the LLM run in their own processes linked by ZeroMQ; "
                    "up to the artifact's compiled batch size sequences decode together.")
    p.add_argument("--model", required=True, help="LLM artifact folder")
    p.add_argument("--vit_model", "--vit-model", dest="vit_model",
                   help="visual artifact folder (required on node 0)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=9900, help="port (default: 9900)")
    p.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int,
                   help="sequences decoding together (default and maximum: the LLM artifact's compiled batch)")
    p.add_argument("--min_pixels", "--min-pixels", dest="min_pixels", type=int, help="lower bound on image pixels")
    p.add_argument("--max_pixels", "--max-pixels", dest="max_pixels", type=int, help="upper bound on image pixels")
    p.add_argument("--served-model-name", dest="served_model_name", help="model name in the API (default: folder)")
    p.add_argument("--api-key", dest="api_key", help="require `Authorization: Bearer KEY`")
    p.add_argument("--allowed-local-media-path", dest="allowed_local_media_path",
                   help="folder under which image_url and video_url may name local files (default: none "
                        "allowed)")
    p.add_argument("--allow-remote-media", dest="allow_remote_media", action="store_true",
                   help="let image_url and video_url fetch http(s) URLs (off by default: the server would fetch "
                        "any address a client names, including ones on its own network)")
    p.add_argument("--remote-media-timeout", dest="remote_media_timeout", type=float, default=10.0,
                   help="seconds allowed for one remote image or video download (default: 10)")
    p.add_argument("--remote-media-max-mb", dest="remote_media_max_mb", type=int, default=20,
                   help="largest remote image or video accepted, in MiB (default: 20)")
    p.add_argument("--max-video-seconds", dest="max_video_seconds", type=float, default=600.0,
                   help="refuse a video_url longer than this (default: 600)")
    p.add_argument("--max-video-frames", dest="max_video_frames", type=int, default=768,
                   help="the most frames sampled from one video; a request's fps, num_frames or max_frames may ask "
                        "for fewer (default: 768)")
    p.add_argument("--video-min-pixels", dest="video_min_pixels", type=int,
                   help="lower bound on each video frame's resized pixels (default: the checkpoint's)")
    p.add_argument("--video-max-pixels", dest="video_max_pixels", type=int,
                   help="upper bound on each video frame's resized pixels (default: the checkpoint's)")
    p.add_argument("--image_cache_mb", "--image-cache-mb", dest="image_cache_mb", type=int, default=256,
                   help="MiB of image and video embeddings kept so that a repeated image (same decoded pixels "
                        "and resize settings) or video (same bytes and sampling) skips the visual graph; least "
                        "recently used go first; 0 disables (default: 256)")
    p.add_argument("--max-request-mb", dest="max_request_mb", type=int, default=64,
                   help="largest request body accepted, in MiB (413 beyond; default: 64)")
    p.add_argument("--body-timeout", dest="body_timeout", type=float, default=30.0,
                   help="seconds a client has to send its request body (408 after; default: 30)")
    p.add_argument("--header-timeout", dest="header_timeout", type=float, default=30.0,
                   help="seconds a new connection has to send its request headers (408 and closed after; "
                        "default: 30)")
    p.add_argument("--send-timeout", dest="send_timeout", type=float, default=30.0,
                   help="seconds a response may wait for a client that reads nothing (a stalled stream); the "
                        "connection is then dropped and its sequence's slot freed (default: 30)")
    p.add_argument("--max-images-per-request", dest="max_images_per_request", type=int, default=16,
                   help="most image parts in one request (default: 16)")
    p.add_argument("--max-videos-per-request", dest="max_videos_per_request", type=int, default=2,
                   help="most video parts in one request (default: 2)")
    p.add_argument("--max-image-pixels", dest="max_image_pixels", type=int, default=50_000_000,
                   help="largest image accepted, width x height as its file declares, checked before it is "
                        "decoded (a few KB of PNG can declare 20000x20000; 413 beyond; default: 50000000)")
    p.add_argument("--max-prompt-tokens", dest="max_prompt_tokens", type=int,
                   help="most prompt tokens (text, images and videos) in one request (default: the LLM artifact's "
                        "compiled prefill length)")
    p.add_argument("--allowed-origins", dest="allowed_origins", nargs="+", metavar="ORIGIN",
                   help="let browsers call the API from these origins (CORS), e.g. https://app.example.com, or * "
                        "for any (default: none: CORS off)")
    p.add_argument("--no-webui", dest="webui", action="store_false",
                   help="do not serve the built-in chat page at / (on by default; it needs no files from the "
                        "network)")
    p.add_argument("--verify", action="store_true",
                   help="check every artifact file's full hash before starting (a start checks sizes and the first "
                        "and last MiB of each file; see vlmc verify)")
    p.add_argument("--llm_devices", "--llm-devices", dest="llm_devices", metavar="LIST",
                   help="devices of the LLM's tensor-parallel ranks, e.g. \"[0,1]\"; must list exactly the "
                        "artifact's tp devices (default: \"[0..tp-1]\"). On CPU hosts the ids are validated and "
                        "reported (start-up log, /health) only")
    p.add_argument("--vit_devices", "--vit-devices", dest="vit_devices", metavar="LIST",
                   help="device of the visual worker, e.g. \"[2]\" (default: \"[0]\"); on CPU reported only")
    from ..llm.cluster import add_cluster_args

    add_cluster_args(p)
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    from ..artifact import tvm_runtime_only

    tvm_runtime_only(args.model, args.vit_model)
    from .server import serve

    return serve(args)
