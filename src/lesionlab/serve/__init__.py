"""HTTP and AWS Lambda front ends for a lesionlab model. Screening aid, not a diagnosis."""

from lesionlab.serve.app import app_from_env, create_app

__all__ = ["create_app", "app_from_env"]
