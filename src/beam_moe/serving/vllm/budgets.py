"""Per-request budgets in vLLM: `beam_avg_k` or `beam_threshold` in a request's `extra_args`.

    SamplingParams(extra_args={"beam_avg_k": 2.0})                  # offline
    extra_body={"vllm_xargs": {"beam_threshold": 0.6}}              # OpenAI-compatible server

How a request's budget reaches its tokens, using only vLLM's public extension points:

- `BeamServingConfig` is registered in vLLM's per-architecture config hooks for the BEAM model
  classes. When an engine's config is built (in the process that builds it, before any request),
  it adds `BeamBudgets` to the engine's logits processors and keeps the checkpoint's threshold
  curve for admission checks.
- `BeamBudgets` is a logits processor that changes no logits. vLLM calls its `validate_params` at
  admission (a bad value becomes an HTTP 400 for that request only) and its `update_state` with the
  persistent batch's changes before every forward pass (vLLM's V1 model runner). It keeps one
  threshold per batch slot in `REQUEST_BUDGETS`.
- The BEAM MoE runners ask `REQUEST_BUDGETS.token_thresholds` once per forward pass: the slots'
  thresholds expanded over each request's tokens by the step's `query_start_loc` (vLLM lays the
  tokens out in batch-slot order). A batch in which no request asks for a budget takes the
  checkpoint's threshold exactly as before.

vLLM's V2 model runner (the default on GPUs with Triton) gives logits processors the batch order
only after the forward pass, so budgets there are refused at admission with a message that says to
start the engine with VLLM_USE_V2_MODEL_RUNNER=0.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch
from torch import Tensor
from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as LogitsProcessorV2

from beam_moe.errors import BeamError
from beam_moe.serving.vllm import compat
from beam_moe.serving.vllm.stats import DEFAULT_LABEL
from beam_moe.threshold_curve import (
    AVG_K_FIELD,
    REQUEST_FIELDS,
    THRESHOLD_FIELD,
    ThresholdCurve,
    requested_budget,
    requested_threshold,
)

logger = init_logger(__name__)

BUDGET_PROCESSOR = "beam_moe.serving.vllm.budgets:BeamBudgets"
V2_REFUSAL = "beam_moe.serving.vllm.budgets:BeamBudgetsRefusedOnV2"


def curve_of(hf_config: Any) -> ThresholdCurve | None:
    """The threshold curve stored in a merged checkpoint's config (`beam_export.threshold_curve`), if any."""
    data = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    stored = (data.get("beam_export") or {}).get("threshold_curve")
    if stored is None:
        return None
    return ThresholdCurve.from_dict(stored, source="config.json: beam_export.threshold_curve")


def budget_label(args: dict[str, Any] | None) -> str:
    """How the budget a request asked for is named in the counters: 'beam_avg_k=1.5', or 'default'."""
    for name in REQUEST_FIELDS:
        if args and args.get(name) is not None:
            return f"{name}={args[name]:g}"
    return DEFAULT_LABEL


class RequestBudgets:
    """The threshold and budget label of each slot of this worker's persistent batch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.enabled = False
        self.default = 0.5
        self.curve: ThresholdCurve | None = None
        self.thresholds: list[float] = []  # NaN: the checkpoint's threshold
        self.labels: list[str] = []
        self._step: Any = None
        self._step_thresholds: Tensor | None = None
        self._step_labels: tuple[Tensor, list[str]] | None = None

    def start(self, max_num_reqs: int, default: float, curve: ThresholdCurve | None) -> None:
        with self._lock:
            self.enabled = True
            self.default, self.curve = default, curve
            self.thresholds = [math.nan] * max_num_reqs
            self.labels = [DEFAULT_LABEL] * max_num_reqs
            self._step = None

    def update(self, batch_update: BatchUpdate | None) -> None:
        """Apply vLLM's batch changes in its documented order: removed, added, moved."""
        if batch_update is None:
            return
        with self._lock:
            for index in batch_update.removed:
                self.thresholds[index], self.labels[index] = math.nan, DEFAULT_LABEL
            for index, params, _prompt, _output in batch_update.added:
                args = getattr(params, "extra_args", None) or {}
                try:
                    threshold = requested_threshold(args, self.curve)
                except BeamError as e:  # admission checks the same rules; this is a second line
                    logger.warning("BEAM: %s; serving this request at the checkpoint's threshold", e)
                    threshold = None
                self.thresholds[index] = math.nan if threshold is None else threshold
                self.labels[index] = DEFAULT_LABEL if threshold is None else budget_label(args)
            for a, b, direction in batch_update.moved:
                if direction == MoveDirectionality.SWAP:
                    self.thresholds[a], self.thresholds[b] = self.thresholds[b], self.thresholds[a]
                    self.labels[a], self.labels[b] = self.labels[b], self.labels[a]
                else:
                    self.thresholds[b], self.labels[b] = self.thresholds[a], self.labels[a]
                    self.thresholds[a], self.labels[a] = math.nan, DEFAULT_LABEL
            self._step = None

    def token_thresholds(self, num_tokens: int, device: torch.device) -> Tensor | None:
        """Each token's threshold (float32 [num_tokens]) for this forward pass, or None when every
        request in it runs at the checkpoint's threshold (computed once per pass, shared by the layers)."""
        self._for_this_step(num_tokens, device)
        return self._step_thresholds

    def token_labels(self, num_tokens: int, device: torch.device) -> tuple[Tensor, list[str]] | None:
        """Each token's budget label (an index into the returned names), or None when every token of
        the pass runs at the checkpoint's threshold (counted as 'default')."""
        self._for_this_step(num_tokens, device)
        return self._step_labels

    def _for_this_step(self, num_tokens: int, device: torch.device) -> None:
        metadata = compat.attention_metadata() if self.enabled else None
        if metadata is None:
            self._step_thresholds = self._step_labels = None
            return
        if metadata is self._step:
            return
        starts = compat.query_start_loc(metadata)
        with self._lock:
            self._step = metadata
            self._step_thresholds = self._step_labels = None
            if starts is None:
                return
            counts = (starts[1:] - starts[:-1]).to("cpu", torch.long)
            num_reqs = counts.numel()
            slots = self.thresholds[:num_reqs]
            if all(math.isnan(t) for t in slots):
                return  # every request at the checkpoint's threshold: the path of an engine without budgets
            names = sorted(set(self.labels[:num_reqs]))
            label_ids = torch.tensor([names.index(x) for x in self.labels[:num_reqs]], dtype=torch.long)
            pad_label = names.index(DEFAULT_LABEL) if DEFAULT_LABEL in names else len(names)
            if pad_label == len(names):
                names.append(DEFAULT_LABEL)
            self._step_labels = (
                _fill(label_ids.repeat_interleave(counts), num_tokens, pad_label).to(device),
                names,
            )
            per_request = torch.tensor(
                [self.default if math.isnan(t) else t for t in slots], dtype=torch.float32
            )
            self._step_thresholds = _fill(per_request.repeat_interleave(counts), num_tokens, self.default).to(
                device
            )


def _fill(values: Tensor, length: int, pad: float | int) -> Tensor:
    """`values` cut or padded to `length` (vLLM may pad a step's tokens past the last request's)."""
    if values.numel() >= length:
        return values[:length]
    return torch.cat([values, torch.full((length - values.numel(),), pad, dtype=values.dtype)])


REQUEST_BUDGETS = RequestBudgets()
_ADMISSION: dict[str, Any] = {"known": False, "curve": None}
"""The checkpoint's curve in the process that built the engine's config. Extra API-server processes
(`--api-server-count`) receive the config already built and never see it: there a budget in
experts is checked for being a number only, and the worker serves one outside the curve's range at
the checkpoint's threshold, with a warning."""


def _validate(sampling_params: Any) -> None:
    args = getattr(sampling_params, "extra_args", None) or {}
    if not any(args.get(name) is not None for name in REQUEST_FIELDS):
        return
    try:
        if _ADMISSION["known"]:
            requested_threshold(args, _ADMISSION["curve"])
        else:
            requested_budget(args)  # the engine's worker checks the range against its curve
    except BeamError as e:
        from vllm.exceptions import VLLMValidationError

        field = next(name for name in REQUEST_FIELDS if args.get(name) is not None)
        raise VLLMValidationError(str(e), parameter=field, value=args.get(field)) from e


class BeamBudgets(LogitsProcessor):
    """Carries each request's BEAM budget to the MoE runners; leaves the logits alone."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        _validate(sampling_params)

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        from beam_moe.merged import effective_beam_config

        hf_config = vllm_config.model_config.hf_config
        default = effective_beam_config(hf_config).threshold
        REQUEST_BUDGETS.start(vllm_config.scheduler_config.max_num_seqs, default, curve_of(hf_config))

    def apply(self, logits: Tensor) -> Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        REQUEST_BUDGETS.update(batch_update)


class BeamBudgetsRefusedOnV2(LogitsProcessorV2):
    """On vLLM's V2 model runner: refuses requests that ask for a budget, says how to get one."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        args = getattr(sampling_params, "extra_args", None) or {}
        field = next((name for name in REQUEST_FIELDS if args.get(name) is not None), None)
        if field is not None:
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(
                f"{field}: per-request BEAM budgets need vLLM's V1 model runner; start the engine "
                "with VLLM_USE_V2_MODEL_RUNNER=0",
                parameter=field,
            )

    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        return False

    def apply(self, logits: Tensor, ctx: Any) -> Tensor:
        return logits


class BeamServingConfig(VerifyAndUpdateConfig):
    """vLLM's per-architecture config hook for the BEAM classes: turns per-request budgets on."""

    @staticmethod
    def verify_and_update_config(vllm_config: Any) -> None:
        model_config = vllm_config.model_config
        processor = V2_REFUSAL if vllm_config.use_v2_model_runner else BUDGET_PROCESSOR
        processors = list(model_config.logits_processors or [])
        if processor not in processors:
            model_config.logits_processors = [*processors, processor]
        _ADMISSION.update(known=True, curve=curve_of(model_config.hf_config))


def register_budgets(architectures: list[str]) -> None:
    """Hook `BeamServingConfig` into vLLM's config building for the BEAM architectures."""
    for architecture in architectures:
        compat.register_config_hook(architecture, BeamServingConfig)


__all__ = [
    "AVG_K_FIELD",
    "BUDGET_PROCESSOR",
    "REQUEST_BUDGETS",
    "THRESHOLD_FIELD",
    "BeamBudgets",
    "BeamServingConfig",
    "budget_label",
    "curve_of",
    "register_budgets",
]
