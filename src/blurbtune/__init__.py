"""blurbtune: fine-tune biomedical language models on BLURB and measure how stable it is."""

__version__ = "0.1.0"
