"""Synthetic instruction data (paper section 3.1): query pool, expansion, image-API synthesis.

taxonomy.py (8 domains / 151 subcategories / seeds, data in taxonomy.json) -> expand.py (LLM
expansion, dedup.py near-duplicate removal, balance) -> synthesize.py (image_api.py clients,
quality.py filters, resumable, cost) ; dishes.py turns dish photos into requests; runlog.py holds
the run reports and progress logs shared with ``duetgen.data.alignment``.
"""
