"""DuetGen: interleaved text-and-image generation from a pretrained MLLM and a video DiT."""

__version__ = "0.1.0"
