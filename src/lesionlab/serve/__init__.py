"""HTTP and AWS Lambda front ends for a lesionlab model. Screening aid, not a diagnosis.

``create_app`` and ``app_from_env`` are loaded on first use (PEP 562), so that reading the service's settings
(``lesionlab.serve.settings``, as the command line does for its options) does not import FastAPI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lesionlab.serve.app import app_from_env, create_app

__all__ = ["app_from_env", "create_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lesionlab.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'lesionlab.serve' has no attribute '{name}'")
