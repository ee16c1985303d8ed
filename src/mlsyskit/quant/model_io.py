"""A quantized model as a directory the engine loads (``mlsyskit generate --model DIR``).

A directory written by :func:`save_model_dir` holds:

- ``model.safetensors`` + ``quant_config.json``: the :mod:`mlsyskit.quant.storage` format. Each
  quantized linear layer is stored under ``"<module path>.weight"`` (packed codes, scales and
  zero points, its scheme in the JSON header); a tied model's quantized head is its quantized
  embedding table, stored once as ``"embed.weight"`` (rows dequantized on lookup); everything
  else (float embeddings, norms, biases) is stored unchanged under its state-dict name. The
  header's extra keys (``meta``) say how the model was quantized (method, requested scheme,
  calibration, source checkpoint).
- ``config.json``: ``TransformerConfig.to_dict()``.
- ``tokenizer.json`` (the ``tokenizers`` library's own format) and ``tokenizer_config.json``
  (``bos_token_id``, ``eos_token_ids``, ``add_bos_token``, ``chat_template``).

:func:`load_model_dir` reads it back as an engine :class:`~mlsyskit.models.checkpoint.Checkpoint`
whose state dict has :class:`~mlsyskit.quant.tensor.QuantizedTensor` values for the quantized
weights; ``build_transformer`` turns those into :class:`~mlsyskit.quant.linear.QuantLinear`
layers with the very same codes, so a reload is bit-exact (identical codes, identical logits).

:func:`quantize_checkpoint` is what ``mlsyskit quantize`` runs: load a checkpoint, quantize it
(round to nearest or AWQ), write the directory atomically and check that it reloads exactly.

Importing this module registers :data:`LOADER` with :func:`mlsyskit.models.checkpoint.
register_loader`, so ``load_checkpoint`` (re-exported here) reads these directories too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mlsyskit.errors import UserError
from mlsyskit.models.checkpoint import Loader, load_checkpoint, register_loader
from mlsyskit.models.transformer import RowEmbedding
from mlsyskit.quant import kernels
from mlsyskit.quant.linear import QuantLinear, WeightOnlyConfig
from mlsyskit.quant.scheme import QuantScheme
from mlsyskit.quant.storage import WEIGHTS, load_quantized, save_quantized
from mlsyskit.quant.tensor import QuantizedTensor

if TYPE_CHECKING:
    from mlsyskit.models.checkpoint import Checkpoint
    from mlsyskit.models.tokenizer import Tokenizer

__all__ = ["LOADER", "load_checkpoint", "load_model_dir", "quantize_checkpoint", "save_model_dir"]

MODEL_CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


def quantized_tensor_of(layer: QuantLinear) -> QuantizedTensor:
    """The :class:`QuantizedTensor` a :class:`QuantLinear` was built from, exactly.

    QuantLinear keeps its codes in the layout its kernel wants (int4 re-packed in 32-wide
    blocks, symmetric int4 codes offset by 8, scales expanded to one row per output); this
    undoes those layout changes without touching a value.
    """
    s = layer.scheme
    scale = layer.scale.float()
    zero = getattr(layer, "zero", None)
    if layer.kind == "q4":
        codes = kernels.unpack_q4_blocks(layer.codes)
        if s.symmetric:  # stored as q + 8 with a constant zero point of 8
            codes, zero = (codes.to(torch.int16) - 8).to(torch.int8), None
    elif layer.kind == "q8" and not s.symmetric:  # stored as q - 128 with the zero point - 128
        codes, zero = (layer.codes.to(torch.int16) + 128).to(torch.uint8), zero + 128
    else:
        codes = layer.codes
    if s.granularity == "tensor":  # one scale, expanded to (n, 1) for the kernels
        scale = scale[:1, :1]
        zero = None if zero is None else zero[:1, :1]
    minimum = getattr(layer, "minimum", None)
    if minimum is not None:  # float zero points: the kernels' zero was derived from these
        zero = None
    return QuantizedTensor(
        codes=codes.clone(),
        scale=scale.clone(),
        zero=None if zero is None else zero.float().clone(),
        scheme=s,
        minimum=None if minimum is None else minimum.clone(),
    )


def model_tensors(model: nn.Module) -> dict[str, Tensor | QuantizedTensor]:
    """The model's state dict with every QuantLinear as ``"<path>.weight"`` -> QuantizedTensor
    (and ``"<path>.bias"`` when it has one) instead of its kernel buffers. A quantized embedding
    table (a :class:`RowEmbedding`) is ``"embed.weight"``; when it is also the tied head it is
    written once (the loader makes it the head again)."""
    embed = model._modules.get("embed")
    table = embed.layer if isinstance(embed, RowEmbedding) else None
    # remove_duplicate=False: a shared table sits under "embed.layer" and "lm_head"
    qlinears = {
        name: m for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, QuantLinear)
    }
    out: dict[str, Tensor | QuantizedTensor] = {}
    for key, value in model.state_dict().items():
        if key.rpartition(".")[0] not in qlinears:
            out[key] = value
    for name, layer in qlinears.items():
        path = "embed" if layer is table else name
        out[f"{path}.weight"] = quantized_tensor_of(layer)
        if layer.bias is not None:
            out[f"{path}.bias"] = layer.bias
    return out


def check_out(out: str | Path, overwrite: bool) -> Path:
    """``out`` as an absolute path; UserError if it exists (and not ``overwrite``) or is a file."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    return out


def save_model_dir(
    model: nn.Module,
    tokenizer: Tokenizer,
    out: str | Path,
    meta: dict[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (a Transformer, some layers QuantLinear) and its tokenizer to ``out``.

    The files are written into a temporary sibling directory which is then renamed to ``out``,
    so an interrupted save never leaves a half-written checkpoint behind. An existing ``out``
    is refused unless ``overwrite``. Returns the directory's path.
    """
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        raise UserError("save_model_dir needs a mlsyskit Transformer (a model with .cfg)")
    out = check_out(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out.parent}: {e}") from None
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_quantized(tmp, model_tensors(model), meta)
        (tmp / MODEL_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        _save_tokenizer(tokenizer, tmp)
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():  # safetensors writes 0600 files; a checkpoint is for sharing
            f.chmod(0o666 & ~umask)
        _replace_dir(tmp, out)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_model_dir(path: str | Path, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """A :class:`Checkpoint` of a :func:`save_model_dir` directory: plain tensors in ``dtype``,
    quantized weights as :class:`QuantizedTensor` (bit-exact). Raises UserError when the
    directory is incomplete, corrupt or does not match its config."""
    from mlsyskit.models.checkpoint import Checkpoint, check_state_dict, check_tokenizer
    from mlsyskit.models.config import TransformerConfig

    path = Path(path)
    tensors, meta = load_quantized(path)  # checks quant_config.json first: the clearest error
    cfg_file = path / MODEL_CONFIG
    try:
        cfg = TransformerConfig.from_dict(json.loads(cfg_file.read_text()))
    except FileNotFoundError:
        raise UserError(f"{cfg_file} is missing (the model's architecture)") from None
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{cfg_file} is unreadable ({e})") from None
    tokenizer = _load_tokenizer(path)
    # A tied model may carry a quantized copy of the embedding as its head: allowed extra.
    tied_head = cfg.tie_embeddings and isinstance(tensors.get("lm_head.weight"), QuantizedTensor)
    check_state_dict(
        {k: v for k, v in tensors.items() if not (tied_head and k == "lm_head.weight")}, cfg, path
    )
    check_tokenizer(tokenizer, cfg, path)
    state = {
        k: v.to(dtype).contiguous() if isinstance(v, Tensor) and v.is_floating_point() else v
        for k, v in tensors.items()
    }
    return Checkpoint(
        config=cfg,
        state_dict=state,  # QuantizedTensor values: build_transformer makes QuantLinears
        tokenizer=tokenizer,
        source=str(path),
        file_type=str(meta.get("label", "mlsyskit-quant")),
        original_bytes=(path / WEIGHTS).stat().st_size,
    )


LOADER = Loader(
    name="mlsyskit-quant",
    matches=lambda path: (path / "quant_config.json").is_file(),
    load=lambda path, dtype: load_model_dir(path, dtype),
)
register_loader(LOADER)


def _save_tokenizer(tokenizer: Tokenizer, folder: Path) -> None:
    # The engine's Tokenizer wraps a `tokenizers.Tokenizer`; its own JSON format is lossless
    # (model, pre-tokenizer, decoder, added/special tokens).
    tokenizer._tk.save(str(folder / TOKENIZER))
    meta = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_ids": list(tokenizer.eos_ids),
        "add_bos_token": tokenizer.add_bos,
        "chat_template": tokenizer.chat_template,
    }
    (folder / TOKENIZER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def _load_tokenizer(folder: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    from mlsyskit.models.tokenizer import Tokenizer

    try:
        backend = HFTokenizer.from_file(str(folder / TOKENIZER))
        meta = json.loads((folder / TOKENIZER_CONFIG).read_text())
        return Tokenizer(
            backend,
            bos_id=meta.get("bos_token_id"),
            eos_ids=[int(i) for i in meta.get("eos_token_ids") or []],
            add_bos=bool(meta.get("add_bos_token", False)),
            chat_template=meta.get("chat_template"),
        )
    except FileNotFoundError as e:
        raise UserError(f"{folder} lacks {Path(e.filename).name} (the tokenizer)") from None
    except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception on bad JSON
        raise UserError(f"the tokenizer in {folder} is unreadable ({e})") from None


def _replace_dir(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` is moved aside first and deleted after,
    so at every moment ``out`` is either the old or the new complete directory (or absent)."""
    if not out.exists():
        os.rename(new, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(out, old)
    os.rename(new, out)
    shutil.rmtree(old, ignore_errors=True)


METHODS = ("rtn", "awq", "gptq", "awq-gptq")
HEADS = ("same", "int8", "float")


def split_head(config: WeightOnlyConfig, lm_head: str) -> tuple[WeightOnlyConfig, WeightOnlyConfig | None]:
    """(config of the body, config of the output projection or None) for ``lm_head``:
    ``"same"`` quantizes the head with ``config``; ``"int8"`` with 8 bits per channel (as
    llama.cpp keeps its output tensor at higher precision, Q6_K); ``"float"`` leaves it float."""
    if lm_head not in HEADS:
        raise UserError(f"unknown lm_head choice {lm_head!r}; use one of {', '.join(HEADS)}")
    if lm_head == "same":
        return config, None
    body = dataclasses.replace(config, include_lm_head=False)
    if lm_head == "float":
        return body, None
    return body, WeightOnlyConfig(
        QuantScheme(bits=8, granularity="channel", symmetric=True, scale_dtype=config.scheme.scale_dtype),
        filter=lambda name, module: name == "lm_head",
    )


def scheme_label(config: WeightOnlyConfig, method: str, lm_head: str = "same") -> str:
    """A short name for a quantization, e.g. ``int4-g128-asym-awq``, ``int8-channel-sym-rtn`` or
    ``int4-g32-fzero-dq-gptq`` (float zero points, double-quantized scales)
    (``-head-int8`` / ``-head-float`` appended when the output projection differs)."""
    s = config.scheme
    where = f"g{s.group_size}" if s.granularity == "group" else s.granularity
    head = "" if lm_head == "same" else f"-head-{lm_head}"
    zero = "sym" if s.symmetric else "fzero" if s.zero_point == "float" else "asym"
    dq = "-dq" if s.double_quant else ""
    return f"int{s.bits}-{where}-{zero}{dq}-{method}{head}"


def check_fits(model: nn.Module, config: WeightOnlyConfig) -> dict[str, int]:
    """Raise UserError now (before any slow work) if a layer the config quantizes cannot take
    its scheme; returns the effective group size per input width (``scheme_for``)."""
    widths = {m.in_features for m in model.modules() if isinstance(m, nn.Linear)}
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False) and config.include_lm_head:
        widths.add(model.embed.weight.shape[1])
    effective = {}
    for k in sorted(widths):
        s = config.scheme_for(k)
        s.n_groups(k)  # raises for a group size that does not divide k
        effective[str(k)] = s.group_size if s.granularity == "group" else k
    return effective


def quantize_checkpoint(
    source: str | Path | None,
    out: str | Path,
    config: WeightOnlyConfig,
    *,
    method: str = "rtn",
    lm_head: str = "same",
    calib_text: str | None = None,
    calib_name: str = "pydoc_data.topics (default)",
    calib_windows: int = 32,
    calib_window_len: int = 256,
    progress: bool = False,
    overwrite: bool = False,
    act_order: bool = False,
    budget: float | None = None,
) -> dict[str, Any]:
    """Load ``source`` (GGUF, HF or None for the embedded default), quantize its linear layers
    with ``config`` by round-to-nearest (``"rtn"``), AWQ (``"awq"``), GPTQ (``"gptq"``, with
    ``act_order`` optionally) or AWQ's scales then GPTQ (``"awq-gptq"``), the last three
    calibrated on ``calib_windows`` windows of ``calib_window_len`` tokens of ``calib_text``
    (None: the default text); the output projection as ``lm_head`` says (:func:`split_head`;
    AWQ does not scale it, GPTQ quantizes it with "same"). With ``budget`` (bits per weight,
    the output projection included), the block layers get mixed widths chosen by sensitivity on
    the calibration windows (:func:`mlsyskit.quant.mixed.plan_mixed`; ``config.scheme`` is the
    cheapest). Writes the model to ``out`` with :func:`save_model_dir`, reloads it and checks
    the logits are identical. Returns a JSON-able summary."""
    import time

    from mlsyskit.models.transformer import build_transformer
    from mlsyskit.quant.linear import quantize_
    from mlsyskit.quant.perplexity import bits_per_weight, file_bytes

    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    check_out(out, overwrite)  # before minutes of work, not after
    t0 = time.perf_counter()
    ckpt = load_checkpoint(source)
    if any(isinstance(v, QuantizedTensor) for v in ckpt.state_dict.values()):
        raise UserError(f"{ckpt.source} is already quantized; quantize the original model")
    model = build_transformer(ckpt.config, ckpt.state_dict)
    body, head = split_head(config, lm_head)
    effective = check_fits(model, body)
    calibration, mixed = None, None
    if method != "rtn" or budget is not None:
        from mlsyskit.quant.calibration import calibration_windows, default_calibration_text

        text = default_calibration_text() if calib_text is None else calib_text
        ids = calibration_windows(ckpt.tokenizer, text, n_windows=calib_windows, window=calib_window_len)
        calibration = {"text": calib_name, "windows": int(ids.shape[0]), "window": int(ids.shape[1])}
    if budget is not None:
        from mlsyskit.quant.mixed import plan_mixed

        dim = model.cfg.dim
        head_scheme = head.scheme if head is not None else None if lm_head == "float" else body.scheme_for(dim)
        plan = plan_mixed(model, ids, body, budget, head_scheme)
        body = dataclasses.replace(body, overrides=plan.schemes)
        widths = plan.widths()
        mixed = {
            "budget": budget,
            "planned_bits_per_weight": round(plan.bits_per_weight, 6),
            "layers_by_bits": {str(b): sum(v == b for v in widths.values()) for b in sorted(set(widths.values()))},
            "bits": widths,
            "errors_rtn": {k: [round(e, 6) for e in v] for k, v in plan.errors.items()},
        }
    if method != "rtn":
        if method.startswith("awq"):
            from mlsyskit.quant.awq import awq_

            # AWQ+GPTQ: AWQ's scales folded in (exact), then GPTQ rounds instead of RTN
            awq_(model, ids, body, progress=progress, quantize=method == "awq")
        if method.endswith("gptq"):
            from mlsyskit.quant.gptq import gptq_

            gptq_(model, ids, body, act_order=act_order, progress=progress)
    else:
        quantize_(model, body)
    if head is not None:
        quantize_(model, head)
    label = scheme_label(config, method, lm_head) + ("" if budget is None else f"-mixed{budget:g}")
    meta = {
        "label": label,
        "method": method,
        "scheme": config.scheme.to_dict(),
        "lm_head": lm_head,
        "fit_group_size": config.fit_group_size,
        "effective_group_size": effective,
        "calibration": calibration,
        "act_order": act_order if method.endswith("gptq") else None,
        "mixed": mixed,
        "source": ckpt.source,
        "source_file_type": ckpt.file_type,
    }
    path = save_model_dir(model, ckpt.tokenizer, out, meta, overwrite=overwrite)
    _check_reload(model, path)
    return {
        "out": str(path),
        "label": label,
        "bits_per_weight": round(bits_per_weight(model), 6),
        "effective_group_size": effective,
        "file_bytes": file_bytes(path),
        "source_bytes": ckpt.original_bytes,
        "calibration": calibration,
        "mixed": None if mixed is None else {k: v for k, v in mixed.items() if k not in ("bits", "errors_rtn")},
        "seconds": round(time.perf_counter() - t0, 2),
    }


@torch.inference_mode()
def _check_reload(model: nn.Module, path: Path) -> None:
    """The written directory must give the very same logits (else: a bug, not a user error)."""
    from mlsyskit.models.transformer import build_transformer

    ckpt = load_model_dir(path)
    again = build_transformer(ckpt.config, ckpt.state_dict, quantized_linear=QuantLinear)
    ids = torch.arange(min(8, ckpt.config.vocab_size)).unsqueeze(0)
    if not torch.equal(model(ids), again(ids)):
        raise RuntimeError(f"{path} does not reload to the model that was saved")
