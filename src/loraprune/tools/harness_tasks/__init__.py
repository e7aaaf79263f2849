"""lm-eval task definitions of loraprune's offline perplexity tasks (YAML files + local_docs.py)."""
