"""HTTP and AWS Lambda front ends for a lesionlab model. Screening aid, not a diagnosis."""

from lesionlab.serve.app import app_from_env, create_app

__all__ = ["app_from_env", "create_app"]
