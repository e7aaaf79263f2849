"""The method, in reading order: load → data → lora → importance/scoring/sketch → groups → schedule
→ pruner → train → shrink → export (modeling_pruned) → evaluate; target resolves --target-params.
"""
