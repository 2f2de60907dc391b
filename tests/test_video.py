"""Video input for the Qwen families: sampling, per-frame pixels, temporal patches and time-aligned M-RoPE against
transformers, `vlmc generate --video` token for token against transformers' generate, and bad videos."""

import ast
import functools
import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from compiled import generate_json, vlmc
from conftest import random_image, write_video
from vlmc.runtime.cpu_ops.video import VideoInputError, VideoRequest, sample_frame_indices

# (frames, fps, height, width, codec, container): lengths, frame rates, aspect ratios and containers
VIDEOS = [(13, 7, 90, 160, "mpeg4", "mp4"), (9, 25, 200, 120, "libvpx-vp9", "webm"), (5, 10, 64, 64, "gif", "gif"),
          (31, 30, 48, 300, "libx264", "mkv"), (40, 24, 120, 90, "mpeg4", "avi")]
REQUESTS = [VideoRequest(), VideoRequest(num_frames=4, min_pixels=3136, max_pixels=12544),
            VideoRequest(fps=3.3, min_pixels=6272, max_pixels=50176), VideoRequest(fps=1, max_frames=4)]


@pytest.fixture(scope="session")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    return [write_video(folder / f"v{i}.{ext}", n, h, w, fps, codec, seed=i)
            for i, (n, fps, h, w, codec, ext) in enumerate(VIDEOS)]


@functools.cache
def transformers_sample_frames():
    """transformers' Qwen2VLVideoProcessor.sample_frames, taken from its source: the module imports torchvision,
    which this host cannot import, and the method needs nothing from it."""
    from transformers.video_utils import VideoMetadata

    path = Path(importlib.util.find_spec("transformers").origin).parent / "models/qwen2_vl/video_processing_qwen2_vl.py"
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "sample_frames")
    namespace = {"math": math, "torch": torch, "VideoMetadata": VideoMetadata}
    exec(compile(ast.Module([fn], type_ignores=[]), str(path), "exec"), namespace)
    defaults = SimpleNamespace(num_frames=None, fps=None, temporal_patch_size=2, min_frames=4, max_frames=768)
    return functools.partial(namespace["sample_frames"], defaults)


def test_sampling_rule_equals_the_video_processor():
    from transformers.video_utils import VideoMetadata

    sample = transformers_sample_frames()
    compared = 0
    for total in (1, 2, 3, 7, 13, 30, 59, 60, 61, 100, 301, 1799, 1800, 7201):
        for source_fps in (1.0, 7.0, 24000 / 1001, 25.0, 30000 / 1001, 30.0, 60.0):
            meta = VideoMetadata(total_num_frames=total, fps=source_fps)
            for kwargs in [{"fps": f} for f in (0.5, 1, 2, 3.3, 24)] + [{"num_frames": k} for k in (1, 2, 4, 5, 9, 16)]:
                try:
                    want = sample(meta, **kwargs).numpy()
                except ValueError:  # more frames asked for than the video has
                    with pytest.raises(VideoInputError):
                        sample_frame_indices(total, source_fps, 2, **kwargs)
                    continue
                except ZeroDivisionError:  # the rule gives no frame: one temporal patch, or all of a shorter clip
                    want = list(range(total)) if total < 2 else sample(meta, num_frames=2).tolist()
                    assert sample_frame_indices(total, source_fps, 2, **kwargs).tolist() == want
                    continue
                got = sample_frame_indices(total, source_fps, 2, **kwargs)
                assert got.tolist() == want.tolist(), (total, source_fps, kwargs)
                compared += 1
    assert compared > 500


def test_linspace_sampling_equals_qwen3_video_processor():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    processor = Qwen3VLVideoProcessor()
    compared = 0
    for total in (1, 2, 3, 7, 13, 30, 59, 61, 100, 1799, 7201):
        for source_fps in (1.0, 7.0, 24000 / 1001, 30.0, 60.0):
            for kwargs in [{"fps": f} for f in (0.5, 1, 2, 3.3, 24)] + [{"num_frames": k} for k in (1, 4, 5, 9)]:
                if kwargs.get("num_frames", 0) > total:
                    with pytest.raises(VideoInputError):
                        sample_frame_indices(total, source_fps, 2, **kwargs, rule="linspace")
                    continue
                want = processor.sample_frames(VideoMetadata(total_num_frames=total, fps=source_fps), **kwargs)
                got = sample_frame_indices(total, source_fps, 2, **kwargs, rule="linspace")
                assert got.tolist() == want.tolist(), (total, source_fps, kwargs)
                compared += 1
    assert compared > 200


def test_video_settings_are_read_where_transformers_reads_them(family_checkpoint, tmp_path):
    """Qwen3-VL's video processor loaded by transformers from the checkpoint has vlmc's settings (Qwen2-VL's cannot
    be imported here: its module needs torchvision); a video_preprocessor_config.json takes precedence over the
    image processor's file, and a Qwen2-style processor reads min_pixels / max_pixels keys."""
    import json
    import shutil

    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from vlmc.build_in.source_code import get_architecture

    ck = family_checkpoint("qwen3_vl", "tiny")
    video = get_architecture("qwen3_vl").host_spec(ck).video
    want = Qwen3VLVideoProcessor.from_pretrained(ck)
    assert (video.min_pixels, video.max_pixels) == (want.size.shortest_edge, want.size.longest_edge)
    assert (video.fps, video.min_frames, video.max_frames, video.max_video_tokens) == \
        (want.fps, want.min_frames, want.max_frames, want.max_video_tokens)
    own = tmp_path / "ck"
    shutil.copytree(family_checkpoint("qwen2_vl", "tiny"), own)
    (own / "video_preprocessor_config.json").write_text(json.dumps({"min_pixels": 1000, "max_pixels": 99999,
                                                                    "fps": 1.5, "max_frames": 64}))
    video = get_architecture("qwen2_vl").host_spec(own).video
    assert (video.min_pixels, video.max_pixels, video.fps, video.max_frames) == (1000, 99999, 1.5, 64)


def frame_shape(frames, count, spec, request):
    """The frame size transformers' video processor of the style picks, with cap_pixels_per_frame=True; a
    request's pixel bounds are per frame (a clip style's own are over the clip)."""
    image, video = spec.image, spec.video
    if video.pixel_bounds == "clip":
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

        shortest = request.min_pixels * count if request.min_pixels else video.min_pixels
        longest = request.max_pixels * count if request.max_pixels else video.max_pixels
        per_frame = max(min(video.max_video_tokens * image.factor ** 2, longest // count), int(shortest * 1.05))
        return smart_resize(count, frames[0].shape[0], frames[0].shape[1], image.temporal_patch_size, image.factor,
                            shortest, per_frame * count)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    min_pixels, max_pixels = request.min_pixels or video.min_pixels, request.max_pixels or video.max_pixels
    total_pixels = int(video.max_video_tokens * image.factor * image.factor * 0.9)
    max_pixels = max(min(max_pixels, total_pixels * image.temporal_patch_size // count), int(min_pixels * 1.05))
    return smart_resize(frames[0].shape[0], frames[0].shape[1], image.factor, min_pixels, max_pixels)


def reference_video(path, request, image_processor, spec):
    """A video the way transformers would process it with the PIL image math per frame: PyAV frames, the video
    processor's sampling rule and per-frame pixel cap (cap_pixels_per_frame), each frame through the PIL image
    processor, frames stacked on the temporal axis in pairs (the video processor's patch order)."""
    import av
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    from transformers.video_utils import VideoMetadata

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    meta = VideoMetadata(total_num_frames=len(frames), fps=float(rate))
    kwargs = {"num_frames": request.num_frames} if request.num_frames else {"fps": request.fps or spec.video.fps}
    if spec.video.sampling == "linspace":
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        processor = Qwen3VLVideoProcessor(max_frames=request.max_frames or spec.video.max_frames)
        indices = processor.sample_frames(meta, **kwargs).tolist()
    else:
        if request.max_frames:
            kwargs["max_frames"] = request.max_frames
        indices = transformers_sample_frames()(meta, **kwargs).tolist()
    meta.frames_indices = indices
    image = spec.image
    height, width = frame_shape(frames, len(indices), spec, request)
    tps, p = image.temporal_patch_size, image.patch_size
    per_frame = []
    for i in indices:
        resized = Image.fromarray(frames[i]).resize((width, height), resample=Image.Resampling.BICUBIC)
        patches = image_processor(images=resized, do_resize=False, return_tensors="np")["pixel_values"]
        per_frame.append(patches.reshape(patches.shape[0], 3, tps, p, p)[:, :, 0])
    per_frame += [per_frame[-1]] * (-len(per_frame) % tps)
    groups = [np.stack(per_frame[t:t + tps], axis=2).reshape(per_frame[0].shape[0], -1)
              for t in range(0, len(per_frame), tps)]
    grid = (len(groups), height // p, width // p)
    return np.concatenate(groups), grid, tps / meta.sampled_fps, meta.timestamps, indices


ARCHS = ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"]


@pytest.mark.parametrize("arch", ARCHS)
def test_video_pixels_equal_the_per_frame_processor(family_checkpoint, checkpoints, videos, arch):
    from transformers import AutoImageProcessor
    from vlmc.build_in.source_code import get_architecture

    ck = checkpoints["tiny"] if arch == "qwen2_5_vl" else family_checkpoint(arch, "tiny")
    spec = get_architecture(arch).host_spec(ck)
    processor = AutoImageProcessor.from_pretrained(ck, backend="pil")
    for path in videos:
        for request in REQUESTS:
            got = spec.prepare_video(path, request)
            pixels, grid, seconds, timestamps, indices = reference_video(path, request, processor, spec)
            assert got.frame_indices == indices, (path, request)
            assert got.grid_thw == grid
            assert got.pixel_values.shape == pixels.shape
            assert np.abs(got.pixel_values - pixels).max() <= 1e-5, (path, request)
            assert got.second_per_grid_t == pytest.approx(seconds, rel=1e-12)
            assert got.timestamps == pytest.approx(timestamps, rel=1e-12)


def _checkpoint(arch, preset, checkpoints, family_checkpoint):
    return checkpoints[preset] if arch == "qwen2_5_vl" else family_checkpoint(arch, preset)


def _video_inputs(prepared) -> dict:
    """The reference's video inputs from vlmc's prepared videos (and each one's transformers VideoMetadata, which
    Qwen3-VL's prompt needs)."""
    from transformers.video_utils import VideoMetadata

    metadata = [VideoMetadata(total_num_frames=v.source["frames"], fps=v.source["fps"], frames_indices=v.frame_indices)
                for v in prepared]
    return {"pixel_values_videos": np.concatenate([v.pixel_values for v in prepared]),
            "video_grid_thw": np.asarray([v.grid_thw for v in prepared]),
            "second_per_grid_ts": [v.second_per_grid_t for v in prepared], "metadata": metadata}


MIXED = [{"role": "user", "content": [
    {"type": "text", "text": "First"}, {"type": "video"}, {"type": "text", "text": "then"}, {"type": "image"},
    {"type": "video"}, {"type": "text", "text": "what changed?"}]}]


@pytest.mark.parametrize("arch", ARCHS)
def test_positions_equal_get_rope_index(family_checkpoint, checkpoints, videos, tmp_path, arch):
    from PIL import Image
    from transformers import AutoTokenizer
    from vlmc.build_in.source_code import get_architecture

    ck = _checkpoint(arch, "tiny", checkpoints, family_checkpoint)
    reference = get_architecture(arch).reference
    model = reference.load_model(ck)
    spec = get_architecture(arch).host_spec(ck)
    tokenizer = AutoTokenizer.from_pretrained(ck)
    image = tmp_path / "img.png"
    random_image(70, 130, seed=3).save(image)
    request = VideoRequest(fps=3.3, min_pixels=6272, max_pixels=50176)
    from vlmc.runtime.cpu_ops.pipeline import prepare_prompt

    for images, clips, messages in [([], videos[:1], None), ([image], videos[1:2], None),
                                    ([image], [videos[3], videos[4]], MIXED)]:
        got = prepare_prompt(tokenizer, spec, images, "Describe.", messages, videos=clips, video_request=request)
        ref = reference.reference_inputs(ck, [Image.open(p) for p in images], "Describe.", model=model,
                                         messages=messages, videos=_video_inputs(got.videos))
        assert got.input_ids.tolist() == ref["input_ids"][0].tolist()
        assert (ref["mm_token_type_ids"] == 2).sum() > 0
        assert np.array_equal(got.position_ids, ref["position_ids"][:, 0].numpy())
        assert got.rope_deltas == int(ref["rope_deltas"][0, 0])
        if arch == "qwen2_5_vl":  # absolute time: temporal positions jump by tokens_per_second * seconds per patch
            assert len(set(np.diff(got.position_ids[0]).tolist())) > 2


# The prompt budget of the test artifacts (256 prefill tokens) holds a few small temporal patches
SMALL_FRAMES = ["--video-min-pixels", "3136", "--video-max-pixels", "12544"]


@pytest.mark.parametrize("arch,preset,tp,with_image", [
    ("qwen2_5_vl", "small", 1, False), ("qwen2_5_vl", "small", 2, True), ("qwen2_5_vl", "tiny", 4, False),
    ("qwen2_vl", "small", 1, True), ("qwen2_vl", "small", 2, False), ("qwen3_vl", "tiny", 1, True)])
def test_generate_video_equals_transformers(checkpoints, qwen_artifacts, family_checkpoint, family_artifacts, videos,
                                            tmp_path, arch, preset, tp, with_image):
    from PIL import Image
    from transformers import AutoTokenizer
    from vlmc.build_in.source_code import get_architecture
    from vlmc.runtime.cpu_ops.pipeline import prepare_prompt

    if arch == "qwen2_5_vl":
        ck, visual, llm = checkpoints[preset], qwen_artifacts[preset, "visual"], qwen_artifacts[preset, tp]
    else:
        ck = family_checkpoint(arch, preset)
        visual, llm = family_artifacts(arch, preset, tp)
    images = []
    if with_image:
        images = [tmp_path / "img.png"]
        random_image(60, 90, seed=5).save(images[0])
    video = videos[0] if with_image else videos[4]
    args = ["--model", llm, "--vit_model", visual, "--video", video, "--prompt", "What moves?", "--max-new-tokens",
            32, "--fps", 4, *SMALL_FRAMES]
    for path in images:
        args += ["--image", path]
    got = generate_json(*args)
    [info] = got["videos"]
    arch_module = get_architecture(arch)
    spec = arch_module.host_spec(ck)
    prepared = prepare_prompt(AutoTokenizer.from_pretrained(ck), spec, images, "What moves?", videos=[video],
                              video_request=VideoRequest(fps=4, min_pixels=3136, max_pixels=12544))
    [clip] = prepared.videos
    assert info["grid_thw"] == list(clip.grid_thw) and info["frame_indices"] == clip.frame_indices
    model = arch_module.reference.load_model(ck)
    ref = arch_module.reference.reference_inputs(ck, [Image.open(p) for p in images], "What moves?", model=model,
                                                 videos=_video_inputs(prepared.videos))
    want = arch_module.reference.generate_reference(model, ref, 32)
    assert got["prompt_tokens"] == ref["input_ids"].shape[1]
    # generate stops at EOS, the reference never does (min_new_tokens): compare what generate produced
    assert got["token_ids"] == want[:len(got["token_ids"])] and len(got["token_ids"]) > 0


@pytest.mark.parametrize("request_, calls, fitted", [
    (VideoRequest(num_frames=6, min_pixels=40000, max_pixels=40000), 2, False),  # 240 patches a frame: 2 a call
    (VideoRequest(num_frames=4, min_pixels=200704), 2, True)])  # 1024 patches a frame, over the 512 budget: shrunk
def test_video_runs_in_chunks_of_temporal_patches(checkpoints, qwen_artifacts, videos, request_, calls, fitted):
    """The tower attends within a temporal patch, so a video split between graph calls equals transformers'
    tower on the whole video; a frame over the budget is shrunk, and the result says so."""
    from vlmc.build_in.source_code.qwen2_5_vl import reference
    from vlmc.runtime.visual.runtime import VisualRuntime

    runtime = VisualRuntime(qwen_artifacts["tiny", "visual"])
    video = runtime.prepare_video(videos[0], request_)
    outputs, used = runtime.encode_video(video)
    assert (used, video.fitted) == (calls, fitted)
    t, h, w = video.grid_thw
    assert h * w <= runtime.budget < t * h * w
    model = reference.load_model(checkpoints["tiny"])
    want = reference.vision_outputs(model, torch.as_tensor(video.pixel_values),
                                    torch.as_tensor([video.grid_thw]))["embeddings"]
    assert outputs["embeddings"].shape == want.shape
    assert np.abs(outputs["embeddings"] - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_bad_videos_get_one_line_errors(checkpoints, family_checkpoint, videos, tmp_path):
    """Undecodable, empty, frameless, too long, bad fps or frame counts, a model without videos: a message that
    names the input; through the CLI one line and exit code 2, never a traceback."""
    import av
    from vlmc.build_in.source_code import get_architecture

    spec = get_architecture("qwen2_5_vl").host_spec(checkpoints["tiny"])
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    frameless = tmp_path / "frameless.avi"  # a video stream with no frame in it
    with av.open(str(frameless), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
    cases = [(empty, VideoRequest(), "not a readable video"), (text, VideoRequest(), "not a readable video"),
             (frameless, VideoRequest(), "no frames"), (tmp_path / "missing.mp4", VideoRequest(), "no such file"),
             (videos[4], VideoRequest(max_seconds=1), "over the limit of 1 s"),
             (videos[0], VideoRequest(num_frames=40), "the video has 13"),
             ("data:video/mp4,abc", VideoRequest(), "data URI")]
    for source, request, says in cases:
        with pytest.raises(VideoInputError, match=says) as err:
            spec.prepare_video(source, request)
        assert str(source)[:40] in str(err.value)
    for kwargs, says in [({"fps": 0}, "fps must be a positive"), ({"fps": -2}, "fps must be a positive"),
                         ({"num_frames": 0}, "num frames must be positive"), ({"fps": 2, "num_frames": 4}, "not both")]:
        with pytest.raises(VideoInputError, match=says):
            VideoRequest(**kwargs)
    internvl = family_checkpoint("internvl", "tiny")  # a tiling family: no video processor
    with pytest.raises(VideoInputError, match="does not take videos"):
        get_architecture("internvl").host_spec(internvl).prepare_video(videos[0])
    for args, says in [(["--video", frameless], "no frames"), (["--video", videos[0], "--fps", "0"], "fps must be"),
                       (["--video", videos[4], "--max-video-seconds", "1"], "over the limit")]:
        proc = vlmc("preprocess", "--checkpoint", checkpoints["tiny"], "--prompt", "hi", "--out", tmp_path / "o.npz",
                    *args, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
