"""FedIT: federated instruction tuning with LoRA adapters."""
