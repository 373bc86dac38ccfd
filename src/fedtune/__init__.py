"""fedtune: federated fine-tuning of LLMs (FedIT with LoRA, FedBPT with CMA-ES)."""

__version__ = "0.1.0"
