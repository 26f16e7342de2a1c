"""Context-alignment data (paper section 3.2): video transition records and adapters from public
image generation / editing sets (ShareGPT-4o-Image, NHR-Edit, OmniGen X2I, UniWorld-V1, Echo-4o).

transitions.py: scenes -> 5 s windows -> first/last frame -> MLLM transition caption -> records.
adapters.py: one reader per public format -> records (text-to-image, edit, multi-reference).
"""
