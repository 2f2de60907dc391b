"""Rotary embeddings computed on the host: M-RoPE position ids and cos/sin for the LLM, 2-D rotary for the vision
tower. Float math runs in torch float32 exactly as the reference does, so the tables are bit-identical."""

from __future__ import annotations

import numpy as np
import torch


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def get_rope_index(input_ids, image_grid_thw, image_token_id: int, spatial_merge_size: int,
                   video_grid_thw=None, video_token_id: int | None = None, second_per_grid_ts=None,
                   tokens_per_second: float | None = None):
    """M-RoPE position ids [3, seq] and rope_delta for one prompt of text, images and videos.

    Text tokens share t = h = w and count up by one; each run of image (or video) pad tokens takes t, h, w from its
    (merged) grid, offset by the position reached so far; the next modality starts at the largest spatial index + 1.
    A video's temporal index is spaced by `tokens_per_second * second_per_grid_t` (Qwen2.5-VL: absolute time; None:
    one per temporal patch, Qwen2-VL), computed in float32 and truncated as the reference does.
    rope_delta = max position + 1 - seq_len, so decode position of token i is i + rope_delta.
    """
    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    kinds = np.zeros(len(ids), dtype=np.int8)  # 0 text, 1 image, 2 video: the processor's mm_token_type_ids
    kinds[ids == image_token_id] = 1
    if video_token_id is not None:
        kinds[ids == video_token_id] = 2
    grids = {1: iter(np.asarray(image_grid_thw if image_grid_thw is not None else [], np.int64).reshape(-1, 3)),
             2: iter(np.asarray(video_grid_thw if video_grid_thw is not None else [], np.int64).reshape(-1, 3))}
    seconds = iter(np.asarray(second_per_grid_ts if second_per_grid_ts is not None else [], np.float32).reshape(-1))
    chunks, current, i = [], 0, 0
    while i < len(ids):
        j = i
        while j < len(ids) and kinds[j] == kinds[i]:
            j += 1
        if kinds[i] == 0:
            chunks.append(np.broadcast_to(np.arange(j - i, dtype=np.int64) + current, (3, j - i)))
            current += j - i
        else:
            name = "image" if kinds[i] == 1 else "video"
            try:
                t, h, w = next(grids[kinds[i]])
            except StopIteration:
                raise ValueError(f"more {name} placeholder runs in the prompt than {name}s") from None
            gt, gh, gw = int(t), int(h) // spatial_merge_size, int(w) // spatial_merge_size
            if gt * gh * gw != j - i:
                raise ValueError(f"{name} placeholder run of {j - i} tokens does not match grid {gt}x{gh}x{gw}")
            temporal = np.arange(gt, dtype=np.int64)
            if kinds[i] == 2 and tokens_per_second is not None:
                interval = np.float32(tokens_per_second) * next(seconds, np.float32(1))
                temporal = (temporal.astype(np.float32) * interval).astype(np.int64)
            tt, hh, ww = np.meshgrid(temporal, np.arange(gh), np.arange(gw), indexing="ij")
            chunks.append(np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + current)
            current += max(int(h), int(w)) // spatial_merge_size
        i = j
    if not chunks:
        return np.zeros((3, 0), np.int64), 0
    positions = np.concatenate(chunks, axis=1).astype(np.int64)
    return positions, int(positions.max()) + 1 - len(ids)


def mrope_cos_sin(position_ids, head_dim: int, theta: float, mrope_section,
                  interleaved: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [seq, head_dim] for M-RoPE: each frequency takes its angle from one row (t, h or w) of position_ids
    [3, seq]. Blocks: the frequency axis is split into (t, h, w) sections in turn. Interleaved: frequency j takes h
    when j % 3 == 1 and j < 3 * sections[1], w when j % 3 == 2 and j < 3 * sections[2], else t (the frequencies are
    selected before cos/sin, as the reference does, so the tables are bit-identical). Three equal rows give 1-D
    RoPE either way."""
    pos = torch.as_tensor(np.asarray(position_ids), dtype=torch.int64).reshape(3, 1, -1)
    freqs = pos[..., None].float() * rope_inv_freq(head_dim, theta)  # [3, 1, seq, head_dim/2]
    if interleaved:
        table = freqs[0].clone()
        for row in (1, 2):
            idx = slice(row, 3 * int(mrope_section[row]), 3)
            table[..., idx] = freqs[row, ..., idx]
        emb = torch.cat((table, table), dim=-1)[0]
        return emb.cos().numpy(), emb.sin().numpy()
    out = []
    for table in (freqs.cos(), freqs.sin()):
        table = torch.cat([m[i % 3] for i, m in enumerate(table.split(list(mrope_section), dim=-1))], dim=-1)
        out.append(torch.cat((table, table), dim=-1)[0].numpy())
    return out[0], out[1]


def vision_position_ids(grid_thw, merge_size: int) -> np.ndarray:
    """(h, w) patch coordinates [N, 2], laid out in merge_size x merge_size blocks as the patches are."""
    out = []
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3):
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge_size, merge_size, w // merge_size, merge_size)
        hpos = hpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hpos, wpos], axis=-1), (int(t), 1)))
    return np.concatenate(out, axis=0)


def vision_cos_sin(position_ids: np.ndarray, head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """2-D axial rotary for the vision tower: cos/sin [N, head_dim] from (h, w) coordinates [N, 2]."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))
    freqs = torch.as_tensor(position_ids)[..., None].float() * inv_freq  # [N, 2, head_dim/4]
    out = []
    for table in (freqs.cos(), freqs.sin()):
        hw = torch.cat([table[:, 0], table[:, 1]], dim=-1)
        out.append(torch.cat([hw, hw], dim=-1).numpy())
    return out[0], out[1]
