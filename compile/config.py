"""Compile YAML configs: schema, validation and command-line overrides.

Every key is declared here (and documented in docs/compile_config.md); an unknown or invalid key fails with the
file, the key and what is allowed. Values the checkpoint determines are derived, or checked when stated.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import VlmcError

from .quantize import COMPUTE_FORMATS, DECODE_COMPUTE_FORMATS, KV_CACHE_FORMATS, QMAX, WEIGHT_FORMATS, Scheme

DTYPES = ("fp32",)  # the activation (compute) dtype; reduced precision is a storage format, see `quantize`
# The vendor's spellings: backend.dtype names the weight format; quantize: w8a16 / w16kv8 (one or a list).
VENDOR_DTYPES = {"fp16": "fp16", "bf16": "bf16", "int8": "int8"}
VENDOR_QUANTIZE = {"w8a16": ("weights", "int8"), "w16kv8": ("kv_cache", "int8")}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VisualShape(_Strict):
    pixel_values: list[int] = Field(min_length=2, max_length=2)
    attention_mask: list[int] | None = Field(default=None, min_length=3, max_length=3)
    cos: list[int] | None = Field(default=None, min_length=2, max_length=2)
    sin: list[int] | None = Field(default=None, min_length=2, max_length=2)

    @model_validator(mode="after")
    def _consistent(self):
        n = self.pixel_values[0]
        if self.attention_mask is not None and self.attention_mask != [1, n, n]:
            raise ValueError(f"attention_mask must be [1, {n}, {n}] for pixel_values [{n}, ...]")
        for name in ("cos", "sin"):
            shape = getattr(self, name)
            if shape is not None and shape[0] != n:
                raise ValueError(f"{name} must have {n} rows like pixel_values")
        return self


class VisualFrontend(_Strict):
    checkpoint: str | None = None
    arch: str | None = None  # the architecture this YAML builds; a checkpoint of another is refused
    type: Literal["huggingface"] = "huggingface"
    max_patches: int | None = Field(default=None, gt=0)
    patch_buckets: list[int] | None = None  # smaller budgets compiled too (default: a quarter, half, three quarters)
    # Tiling models (the budget is in tiles): the most grid tiles an image is cut into (its thumbnail / global
    # tile not counted), the tiles one graph call runs (default max_tiles + 1: one call per image) and smaller
    # tile counts compiled too (default: 1)
    max_tiles: int | None = Field(default=None, gt=0)
    tiles_per_call: int | None = Field(default=None, gt=0)
    tile_buckets: list[int] | None = None
    shape: VisualShape | None = None
    onnx: bool = False  # also export ONNX and check it with onnxruntime

    @property
    def tiled(self) -> bool:
        return self.max_tiles is not None

    def per_call(self) -> int:
        """Tiles one graph call runs: tiles_per_call, or an image's most tiles with its thumbnail."""
        return self.tiles_per_call or self.max_tiles + (1 if self.max_tiles > 1 else 0)

    @model_validator(mode="after")
    def _budget(self):
        if self.tiled:
            if self.max_patches is not None or self.shape is not None or self.patch_buckets is not None:
                raise ValueError("max_tiles sets a tiling model's budget; max_patches, patch_buckets and shape do not "
                                 "apply with it")
            per_call = self.per_call()
            for b in self.tile_buckets or []:
                if not 0 < b <= per_call:
                    raise ValueError(f"tile bucket {b} must be between 1 and tiles_per_call {per_call}")
            return self
        if self.tiles_per_call is not None or self.tile_buckets is not None:
            raise ValueError("tiles_per_call and tile_buckets apply to a tiling model's config (set max_tiles)")
        if self.max_patches is None and self.shape is None:
            self.max_patches = 1024
        if self.shape is not None:
            n = self.shape.pixel_values[0]
            if self.max_patches is not None and self.max_patches != n:
                raise ValueError(f"max_patches {self.max_patches} disagrees with shape.pixel_values [{n}, ...]")
            self.max_patches = n
        if self.max_patches % 16:
            raise ValueError(f"the patch budget must be a multiple of 16, got {self.max_patches}")
        for b in self.patch_buckets or []:
            if b <= 0 or b % 16 or b > self.max_patches:
                raise ValueError(f"patch bucket {b} must be a positive multiple of 16 and at most the budget "
                                 f"{self.max_patches}")
        return self

    def buckets(self) -> list[int]:
        """Every compiled patch budget (or tile count), ascending; the largest is max_patches (tiles_per_call). An
        image runs in the smallest that holds it, so small images do not pay for the whole budget."""
        if self.tiled:
            return sorted(set(self.tile_buckets if self.tile_buckets is not None else [1]) | {self.per_call()})
        n = self.max_patches
        default = [-(-n * k // 4) // 16 * 16 for k in (1, 2, 3)]  # quarters, rounded up to multiples of 16
        chosen = self.patch_buckets if self.patch_buckets is not None else [b for b in default if b >= 64]
        return sorted(set(chosen) | {n})


class Backend(_Strict):
    type: Literal["tvm"] = "tvm"
    target: str | dict[str, Any] = "llvm"
    dtype: str = "fp32"
    # GEMM input precision of the prompt and vision graphs' linear layers: fp32, bf16 (inputs rounded to bf16,
    # fp32 accumulation and outputs), or int8 (int8 layers with one scale per row: inputs quantized per row, int8 x
    # int8 GEMMs; the others bf16; compile/quantize.py). Decode GEMVs keep fp32 inputs.
    compute: Literal[COMPUTE_FORMATS] = "fp32"
    # GEMV input precision of the LLM's decode graphs: fp32, or int8 (int8/int4 layers quantize their input per block
    # of 32 and take integer dot products; compile/quantize.py). Not exact: opt-in.
    decode_compute: Literal[DECODE_COMPUTE_FORMATS] = "fp32"
    output_chunks: Literal["auto"] | list[int] = "auto"
    max_chunk_width: int = Field(default=640, gt=0)
    blas: bool = True  # dispatch matmuls to the host BLAS (CPU targets)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v):
        if v not in DTYPES:
            raise ValueError(f"dtype {v!r} is not supported; allowed: {', '.join(DTYPES)} (activations), or the "
                             f"weight formats {', '.join(VENDOR_DTYPES)} (mapped to quantize.weights)")
        return v

    @field_validator("target")
    @classmethod
    def _target(cls, v):
        if isinstance(v, str) and v.strip().startswith("{"):
            try:
                v = json.loads(v)
            except json.JSONDecodeError as exc:
                raise ValueError(f"target looks like JSON but does not parse: {exc}") from None
        if isinstance(v, dict) and "kind" not in v:
            raise ValueError("a target dict needs a 'kind' (e.g. {kind: llvm})")
        return v

    @field_validator("output_chunks")
    @classmethod
    def _chunks(cls, v):
        if isinstance(v, list) and (not v or min(v) <= 0):
            raise ValueError("output_chunks must be positive widths")
        return v


class Workspace(_Strict):
    path: str = "workspace"


class VisualQuantize(_Strict):
    """Storage precision of the weights (docs/compile_config.md, "Reduced precision")."""

    weights: Literal[WEIGHT_FORMATS] = "fp32"
    group_size: Literal["channel", 32, 64, 128] | None = None  # default: int8 channel, int4 64
    skip: list[str] = []  # layer globs (deploy-model names, or checkpoint names of fused parts) that stay fp32

    @model_validator(mode="after")
    def _group(self):
        if self.group_size is not None and self.weights not in ("int8", "int4"):
            raise ValueError(f"group_size applies to int8 and int4 weights, not {self.weights}")
        return self

    def scheme(self) -> Scheme:
        return Scheme(self.weights, self.group_size, getattr(self, "kv_cache", "fp32"), tuple(self.skip))


class LLMQuantize(VisualQuantize):
    kv_cache: Literal[KV_CACHE_FORMATS] = "fp32"


def _vendor_spellings(data, kind: str):
    """Map the vendor's `backend.dtype: fp16|bf16|int8` and `quantize: w8a16|w16kv8` onto `quantize:`."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    quant = data.get("quantize")
    if isinstance(quant, (str, list)):
        mapped = {}
        for word in [quant] if isinstance(quant, str) else quant:
            if word not in VENDOR_QUANTIZE:
                raise ValueError(f"quantize: {word!r} is not a known scheme; use {', '.join(VENDOR_QUANTIZE)} or a "
                                 f"mapping with weights, group_size, skip" + (", kv_cache" if kind == "llm" else ""))
            key, value = VENDOR_QUANTIZE[word]
            if key == "kv_cache" and kind != "llm":
                raise ValueError(f"quantize: {word} sets the KV cache, which only LLM configs have")
            mapped[key] = value
        quant = mapped
    backend = data.get("backend")
    if isinstance(backend, dict) and backend.get("dtype") in VENDOR_DTYPES:
        backend = dict(backend)
        weights = VENDOR_DTYPES[backend.pop("dtype")]
        quant = dict(quant or {})
        if quant.get("weights", "fp32") == "fp32":  # an explicit quantize.weights (e.g. w8a16) wins
            quant["weights"] = weights
        data["backend"] = backend
    if quant is not None:
        data["quantize"] = quant
    return data


class VisualConfig(_Strict):
    name: str = Field(min_length=1)
    kind: Literal["visual"] = "visual"
    frontend: VisualFrontend = VisualFrontend()
    backend: Backend = Backend()
    quantize: VisualQuantize = VisualQuantize()
    workspace: Workspace = Workspace()

    @model_validator(mode="before")
    @classmethod
    def _vendor(cls, data):
        return _vendor_spellings(data, "visual")

    @model_validator(mode="after")
    def _decode_compute(self):
        if self.backend.decode_compute != "fp32":
            raise ValueError("backend.decode_compute applies to LLM configs (their decode graphs); a visual graph's "
                             "GEMM inputs are backend.compute")
        _check_int8_compute(self)
        return self


def _check_int8_compute(cfg) -> None:
    """backend.compute: int8 needs int8 weights with one scale per row: with any other storage every layer would
    take bf16 inputs, which is compute: bf16 under another name."""
    q = cfg.quantize
    if cfg.backend.compute == "int8" and (q.weights != "int8" or q.group_size not in (None, "channel")):
        stored = q.weights + (f" in groups of {q.group_size}" if q.group_size not in (None, "channel") else "")
        raise ValueError(f"backend.compute: int8 runs int8 x int8 GEMMs for int8 weights with one scale per row "
                         f"(quantize.weights: int8, group_size: channel); the weights are {stored}: use those, or "
                         f"backend.compute: bf16")


class LLMShape(_Strict):
    input_ids: list[list[int]] = Field(min_length=2, max_length=2)


class LLMModelKwargs(_Strict):
    tp: int = Field(default=1, ge=1)
    batch_size: int = Field(default=1, ge=1)  # decode batch (continuous batching)
    prefill_buckets: list[int] | None = None
    decode_buckets: list[int] | None = None  # decode graphs' batch sizes (batch_size is always one)

    @model_validator(mode="after")
    def _decode_buckets(self):
        for b in self.decode_buckets or []:
            if not 1 <= b <= self.batch_size:
                raise ValueError(f"decode bucket {b} must be between 1 and batch_size={self.batch_size}")
        return self


class LLMFrontend(_Strict):
    checkpoint: str | None = None
    arch: str | None = None  # the architecture this YAML builds; a checkpoint of another is refused
    type: Literal["huggingface"] = "huggingface"
    shape: LLMShape = LLMShape(input_ids=[[256], [1024]])
    model_kwargs: LLMModelKwargs = LLMModelKwargs()

    @model_validator(mode="after")
    def _shape(self):
        (p,), (t,) = self.shape.input_ids[0][:1], self.shape.input_ids[1][:1]
        if len(self.shape.input_ids[0]) != 1 or len(self.shape.input_ids[1]) != 1:
            raise ValueError("shape.input_ids must be [[P], [T]]")
        for label, v in (("prefill length P", p), ("context T", t)):
            if v <= 0 or v % 16:
                raise ValueError(f"the {label} must be a positive multiple of 16, got {v}")
        if p > t:
            raise ValueError(f"the prefill length P={p} exceeds the context T={t}")
        for b in self.model_kwargs.prefill_buckets or []:
            if b <= 0 or b % 16 or b > p:
                raise ValueError(f"prefill bucket {b} must be a multiple of 16 and at most P={p}")
        return self

    @property
    def max_prefill(self) -> int:
        return self.shape.input_ids[0][0]

    @property
    def context(self) -> int:
        return self.shape.input_ids[1][0]


class LLMConfig(_Strict):
    name: str = Field(min_length=1)
    kind: Literal["llm"] = "llm"
    frontend: LLMFrontend = LLMFrontend()
    backend: Backend = Backend()
    quantize: LLMQuantize = LLMQuantize()
    workspace: Workspace = Workspace()

    @model_validator(mode="before")
    @classmethod
    def _vendor(cls, data):
        return _vendor_spellings(data, "llm")

    @model_validator(mode="after")
    def _decode_compute(self):
        if self.backend.decode_compute == "int8" and self.quantize.weights not in QMAX:
            raise ValueError(f"backend.decode_compute: int8 quantizes the inputs of int8/int4 layers; the weights are "
                             f"{self.quantize.weights} (set quantize.weights: int8 or int4)")
        _check_int8_compute(self)
        if self.backend.compute == "int8" and self.frontend.model_kwargs.tp > 1:
            raise ValueError(f"backend.compute: int8 quantizes each row of a layer's input as a whole, which a "
                             f"row-parallel layer's rank does not see at tp={self.frontend.model_kwargs.tp}; use tp 1, "
                             f"or backend.compute: bf16")
        return self


def _allowed_keys(model: type[BaseModel], loc) -> list[str]:
    """The keys allowed at `loc` (a path of keys) in `model`'s schema."""
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        nested = [c for c in getattr(field.annotation, "__args__", (field.annotation,))
                  if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return sorted(model.model_fields)


def _format_error(model: type[BaseModel], where: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, err["loc"][:-1])
            lines.append(f"unknown key '{key}' (allowed here: {', '.join(allowed)})")
        else:
            lines.append(f"'{key}': {err['msg']}" if key else err["msg"])
    return f"{where}: " + "; ".join(lines)


_KIND_MODELS = {"visual": VisualConfig, "llm": LLMConfig}


def load_config(path: str | Path, kind: str | None = None) -> VisualConfig | LLMConfig:
    """Read and validate a compile YAML. `kind` is taken from the file's `kind:` key when not given."""
    path = Path(path)
    if not path.is_file():
        raise VlmcError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise VlmcError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise VlmcError(f"{path}: expected a mapping of keys at the top level")
    kind = kind or data.get("kind")
    if kind not in _KIND_MODELS:
        raise VlmcError(f"{path}: 'kind' must be one of {', '.join(_KIND_MODELS)} (got {kind!r})")
    model = _KIND_MODELS[kind]
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise VlmcError(_format_error(model, str(path), exc)) from None


def apply_overrides(cfg, path: Path, **overrides):
    """Return a validated copy of `cfg` with command-line values (those not None) put at their keys."""
    data = cfg.model_dump()
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    model = type(cfg)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise VlmcError(_format_error(model, f"{path} (with command-line overrides)", exc)) from None


def resolve_checkpoint(checkpoint: str | None, config_path: Path) -> Path:
    """The checkpoint folder: as given, or relative to the YAML's folder; must hold a config.json."""
    if not checkpoint:
        raise VlmcError(f"{config_path}: no checkpoint given (set frontend.checkpoint or pass --checkpoint)")
    path = Path(checkpoint)
    if not path.is_absolute() and not path.exists():
        path = config_path.parent / path
    if not (path / "config.json").is_file():
        raise VlmcError(f"checkpoint {checkpoint} is not a Hugging Face checkpoint folder (no config.json)")
    return path.resolve()


def config_hash(cfg) -> str:
    """Hash of everything that shapes the artifact (the workspace location does not)."""
    data = cfg.model_dump(exclude={"workspace"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def resolve_chunks(backend: Backend, hidden: int) -> list[int]:
    if backend.output_chunks == "auto":
        full, rest = divmod(hidden, backend.max_chunk_width)
        return [backend.max_chunk_width] * full + ([rest] if rest else [])
    if sum(backend.output_chunks) != hidden:
        raise VlmcError(f"backend.output_chunks {backend.output_chunks} add up to {sum(backend.output_chunks)}, "
                        f"not the output hidden size {hidden}")
    return list(backend.output_chunks)
