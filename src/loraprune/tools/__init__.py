"""Side tools around the pipeline: diagnose, the lm-eval harness, inspect, estimate (memory),
the digits ViT, plots and report.md.
"""
