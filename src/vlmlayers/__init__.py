"""vlmlayers: where does visual instruction tuning put image meaning inside an LLM's layers?

Pipeline for "Visual Instruction Tuning Aligns Modalities through Abstraction" (arXiv 2606.03871).
"""

__version__ = "0.1.0"
