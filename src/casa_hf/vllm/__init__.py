"""CASA checkpoints on vLLM, as an out-of-tree plugin: vLLM calls `register()` in each of its processes (entry point
`casa = casa_hf.vllm:register`, group `vllm.general_plugins`), which

- registers CASA's config and processor with Transformers' Auto classes (`import casa_hf`) and the model under its
  architecture name, `CasaForConditionalGeneration`, with vLLM;
- turns prefix caching off for it (a cached prefix would skip its images' encoders and the windows they open, which
  live outside vLLM's KV cache) and runs it eagerly (its CASA layers loop over requests in Python);
- has vLLM's model runner release a finished request's CASA windows (`_on_request_state_removed`, the runner's hook
  for request-scoped side caches), and its scheduler keep the images of one window in one step (`scheduling.py`);
- has vLLM's chat rendering put a user message's images first when the model's processor groups them (`chat.py`), as
  `CasaProcessor.apply_chat_template` does.

How CASA maps onto vLLM, and what works: docs/vllm.md.
"""

from __future__ import annotations

import logging

from .chat import group_chat_images
from .scheduling import keep_image_runs_whole

ARCHITECTURE = "CasaForConditionalGeneration"

logger = logging.getLogger("vllm.casa_hf")  # under vLLM's logger, whose handlers print it


class CasaVllmConfig:
    """vLLM's per-architecture config hook (`MODELS_CONFIG_MAP`) for CASA models."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from vllm.config import CompilationMode, CUDAGraphMode

        cache_config = vllm_config.cache_config
        if cache_config.enable_prefix_caching:
            cache_config.enable_prefix_caching = False
            logger.info("CASA: prefix caching off (its windows live outside vLLM's KV cache)")
        compilation = vllm_config.compilation_config
        if compilation.mode != CompilationMode.NONE or compilation.cudagraph_mode != CUDAGraphMode.NONE:
            compilation.mode = CompilationMode.NONE
            compilation.cudagraph_mode = CUDAGraphMode.NONE
            logger.info("CASA: runs eagerly (no torch.compile, no CUDA graphs)")
        if vllm_config.speculative_config is not None:
            raise ValueError("CASA models on vLLM do not support speculative decoding yet")
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ValueError("CASA models on vLLM run with tensor parallelism only (pipeline_parallel_size=1)")


def _release_windows_of_finished_requests() -> None:
    """Wrap the runner's hook for request-scoped side caches: a finished CASA request's windows go with it."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    hook = GPUModelRunner._on_request_state_removed
    if getattr(hook, "releases_casa_windows", False):
        return

    def on_request_state_removed(self, req_id, req_state) -> None:
        hook(self, req_id, req_state)
        model = self.get_model() if hasattr(self, "model") else None
        if req_state is not None and req_state.block_ids and hasattr(model, "release_request_windows"):
            first_group = req_state.block_ids[0]
            if first_group:
                model.release_request_windows(first_group[0])

    on_request_state_removed.releases_casa_windows = True
    GPUModelRunner._on_request_state_removed = on_request_state_removed


def register() -> None:
    """vLLM's plugin entry point: make CASA checkpoints servable in this process."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    import casa_hf  # noqa: F401  (CASA's config and processor in Transformers' Auto classes)

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "casa_hf.vllm.model:CasaForConditionalGeneration")
    MODELS_CONFIG_MAP[ARCHITECTURE] = CasaVllmConfig
    _release_windows_of_finished_requests()
    keep_image_runs_whole()
    group_chat_images()


__all__ = ["ARCHITECTURE", "register"]
