"""Evaluation: metrics with bootstrap CIs, calibration and operating point, scoring a run, reports, figures."""
