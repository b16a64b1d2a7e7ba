"""The one sentence every output that a person reads carries: reports, the API, the model card, the web page.

Its own module so that the service can say it without importing the evaluation stack (scipy, scikit-learn).
"""

DISCLAIMER = (
    "lesionlab is a research tool that screens images; it does not diagnose. A result is not a "
    "medical opinion: any lesion that worries you needs a clinician."
)
